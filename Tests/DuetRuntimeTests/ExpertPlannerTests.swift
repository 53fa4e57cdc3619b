import DuetRuntime
import Testing

/// Hand-computable plans. Costs in milliseconds (as seconds-shaped numbers: only ratios matter).
@Suite struct ExpertPlannerTests {
    typealias P = ExpertPlanner

    /// Fiddler's decode case: one token on a non-resident expert; copying its weights (70)
    /// costs far more than computing it on the CPU (7).
    @Test func decodeComputesOnTheCPU() {
        let model = P.LatencyModel(cpu: .init(fixed: 0, perToken: 7), gpu: .init(fixed: 0.1, perToken: 0), transfer: 70)
        let plan = P.plan([.init(expert: 3, tokens: 1, resident: true), .init(expert: 5, tokens: 1, resident: false)], model: model)
        #expect(plan.resident == [3] && plan.cpu == [5] && plan.copied.isEmpty)
        #expect(plan.makespan == 7)
    }

    /// A long prefill: 100 tokens cost 700 on the CPU, 1 + 70 copied to the GPU.
    @Test func prefillCopiesTheExpert() {
        let model = P.LatencyModel(cpu: .init(fixed: 0, perToken: 7), gpu: .init(fixed: 1, perToken: 0), transfer: 70)
        let plan = P.plan([.init(expert: 0, tokens: 100, resident: false)], model: model)
        #expect(plan.copied == [0] && plan.cpu.isEmpty)
        #expect(plan.makespan == 71)
    }

    /// Two experts, each 10 on the CPU or 1 + 7 copied: minimising the sum copies both
    /// (16 on the GPU side); the makespan is smallest with one on each side: max(10, 8) = 10.
    @Test func balancesInsteadOfMinimisingTheSum() {
        let model = P.LatencyModel(cpu: .init(fixed: 0, perToken: 10), gpu: .init(fixed: 1, perToken: 0), transfer: 7)
        let plan = P.plan([.init(expert: 1, tokens: 1, resident: false), .init(expert: 2, tokens: 1, resident: false)], model: model)
        #expect(plan.cpu.count == 1 && plan.copied.count == 1)
        #expect(plan.makespan == 10)
    }

    /// Resident experts load the GPU side, which can make the CPU the better home for the rest:
    /// GPU already busy 30; a copy would add 1 + 7, the CPU takes 10.
    @Test func residentWorkCountsOnTheGPUSide() {
        let model = P.LatencyModel(cpu: .init(fixed: 0, perToken: 10), gpu: .init(fixed: 0, perToken: 1), transfer: 7)
        let plan = P.plan([.init(expert: 0, tokens: 30, resident: true), .init(expert: 4, tokens: 1, resident: false),
                           .init(expert: 6, tokens: 0, resident: false)], model: model)
        #expect(plan.resident == [0] && plan.cpu == [4] && plan.copied.isEmpty)
        #expect(plan.gpuSeconds == 30 && plan.cpuSeconds == 10 && plan.makespan == 30)
    }

    /// Beyond the exhaustive limit: 20 alike experts, 10 on the CPU or 8 copied; copying k gives
    /// max(10 (20 - k), 8 k), smallest at k = 11: max(90, 88) = 90.
    @Test func manyExpertsUseTheOrderedPrefix() {
        let model = P.LatencyModel(cpu: .init(fixed: 0, perToken: 10), gpu: .init(fixed: 1, perToken: 0), transfer: 7)
        let loads = (0..<20).map { P.Load(expert: $0, tokens: 1, resident: false) }
        #expect(loads.count > P.exhaustiveLimit)
        let plan = P.plan(loads, model: model)
        #expect(plan.copied.count == 11 && plan.cpu.count == 9)
        #expect(plan.makespan == 90)
    }

    /// Copies slow the CPU down (shared DRAM). Each expert: 10 on the CPU, 1 + 12 copied.
    /// With the CPU 1.5x slower while a copy runs, one expert on each side takes
    /// max(15, 13) = 15, better than both on the CPU (20) or both copied (26); at 2.5x it
    /// would take max(25, 13) = 25, so both stay on the CPU.
    @Test func copiesSlowTheCPU() {
        let loads = [P.Load(expert: 1, tokens: 1, resident: false), P.Load(expert: 2, tokens: 1, resident: false)]
        var model = P.LatencyModel(cpu: .init(fixed: 0, perToken: 10), gpu: .init(fixed: 1, perToken: 0), transfer: 12, cpuSlowdownWhileCopying: 1.5)
        #expect(P.plan(loads, model: model).makespan == 15)
        model.cpuSlowdownWhileCopying = 2.5
        let plan = P.plan(loads, model: model)
        #expect(plan.copied.isEmpty && plan.makespan == 20)
    }

    /// A copy that saves less than the margin is not worth the model's error: 10 on the CPU
    /// vs 1 + 8 = 9 copied (10% less) stays on the CPU; vs 1 + 7 = 8 (20% less) is copied.
    @Test func smallGainsStayOnTheCPU() {
        let loads = [P.Load(expert: 0, tokens: 1, resident: false)]
        #expect(P.plan(loads, model: .init(cpu: .init(fixed: 10, perToken: 0), gpu: .init(fixed: 1, perToken: 0), transfer: 8)).copied.isEmpty)
        #expect(P.plan(loads, model: .init(cpu: .init(fixed: 10, perToken: 0), gpu: .init(fixed: 1, perToken: 0), transfer: 7)).copied == [0])
    }

    /// Decode with both routed experts off the device: 3.2 each on the CPU, 6.4 + 0.1 copied.
    /// One copied costs max(3.2, 6.5) = 6.5 against 6.4 on the CPU, so without credit both
    /// stay there; a credit of 2 (the copy is likely hit by later steps) makes the copy's
    /// 4.5 worth taking (below 0.85 x 6.4); a credit of 0.8 (4.5 + 1.2 = 5.7) is not.
    @Test func aCreditedCopyIsTakenWhenItCostsLittleNow() {
        let model = P.LatencyModel(cpu: .init(fixed: 3.2, perToken: 0), gpu: .init(fixed: 0.1, perToken: 0), transfer: 6.4)
        let loads = [P.Load(expert: 1, tokens: 1, resident: false), P.Load(expert: 6, tokens: 1, resident: false)]
        #expect(P.plan(loads, model: model).copied.isEmpty)
        let credited = P.plan(loads, model: model, copyCredit: 2)
        #expect(credited.copied.count == 1 && credited.cpu.count == 1)
        #expect(abs(credited.makespan - 6.5) < 1e-12)  // the makespan itself is not credited
        #expect(P.plan(loads, model: model, copyCredit: 0.8).copied.isEmpty)
        // One expert off the device: copying costs 3.3 more now, more than a credit of 2 returns.
        #expect(P.plan([loads[0]], model: model, copyCredit: 2).copied.isEmpty)
    }

    /// The reuse a copy is credited with, by hand: both estimates start at the routed share
    /// (2 of 8); a layer routing {1, 2} twice moves "again" to 0.25 + 0.05 (1 - 0.25) = 0.2875,
    /// and the would-be victim 0 not coming back moves "evicted" to 0.25 - 0.05 x 0.25 = 0.2375.
    @Test func reuseIsLearnedPerLayerStep() {
        var r = ReuseEstimate(layers: 2, routedShare: 0.25)
        #expect(r.observe(layer: 0, routed: [1, 2], evicted: 0) == 0)  // nothing to compare with yet
        #expect(r.observe(layer: 1, routed: [5, 6], evicted: 3) == 0)  // nor in layer 1
        let credit = r.observe(layer: 0, routed: [1, 2], evicted: 0)
        #expect(abs(r.again - 0.2875) < 1e-12 && abs(r.evicted - 0.2375) < 1e-12)
        #expect(abs(credit - 0.05) < 1e-12)
        // Layer 1 now routes what it evicted before and nothing it routed: no credit.
        #expect(r.observe(layer: 1, routed: [3, 4], evicted: 5) == 0)
    }

    /// Nothing routed: nothing to do.
    @Test func emptyLayer() {
        let model = P.LatencyModel(cpu: .init(fixed: 1, perToken: 1), gpu: .init(fixed: 1, perToken: 1), transfer: 1)
        #expect(P.plan([.init(expert: 0, tokens: 0, resident: false)], model: model) == P.Plan())
    }
}
