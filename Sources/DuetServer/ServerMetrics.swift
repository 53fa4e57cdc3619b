import DuetCore
import DuetModels
import Prometheus
import Synchronization

/// What `GET /metrics` reports, in Prometheus' text format. Counters of requests are kept
/// as they happen; the engine's load, the expert usage and the GPU memory are read when
/// scraped.
final class ServerMetrics: Sendable {
    let registry = PrometheusCollectorRegistry()
    private let engine: InferenceEngine
    private let gpuMemory: (@Sendable () -> [String: Int])?

    private let queueLength: Gauge
    private let activeSequences: Gauge
    private let generatedTokens: Counter
    private let promptTokens: Counter
    private let tokensPerSecond: Gauge
    private let steps: Counter
    private let hitRate: Gauge
    private let cpuExpertSeconds: Counter
    private let gpuExpertSeconds: Counter
    /// The totals the counters were last advanced to (they only count up).
    private let counted = Mutex<[String: Double]>([:])
    /// (time, generated tokens) at the last scrape, for the rate.
    private let lastScrape = Mutex<(ContinuousClock.Instant, Int)?>(nil)

    init(engine: InferenceEngine, gpuMemory: (@Sendable () -> [String: Int])?) {
        self.engine = engine
        self.gpuMemory = gpuMemory
        queueLength = registry.makeGauge(descriptor: Self.named("queue", "length", "Sequences waiting for a batch slot or KV cache room."))
        activeSequences = registry.makeGauge(descriptor: Self.named("active", "sequences", "Sequences in the running batch."))
        generatedTokens = registry.makeCounter(descriptor: Self.named("generated_tokens", "total", "Tokens generated since start."))
        promptTokens = registry.makeCounter(descriptor: Self.named("prompt_tokens", "total", "Prompt tokens of finished sequences."))
        tokensPerSecond = registry.makeGauge(descriptor: Self.named("generated_tokens", "per_second", "Generation rate since the previous scrape."))
        steps = registry.makeCounter(descriptor: Self.named("forward_steps", "total", "Batched forward steps run."))
        hitRate = registry.makeGauge(descriptor: Self.named("expert_hit", "rate", "Share of routed token-expert pairs computed on the GPU."))
        cpuExpertSeconds = registry.makeCounter(descriptor: Self.named("expert_seconds", "total", "Time spent in expert FFNs."), labels: [("device", "cpu")])
        gpuExpertSeconds = registry.makeCounter(descriptor: Self.named("expert_seconds", "total", "Time spent in expert FFNs."), labels: [("device", "gpu")])
    }

    /// Counts one answered request.
    func countRequest(route: String, status: Int) {
        registry.makeCounter(descriptor: Self.named("requests", "total", "HTTP requests answered, by route and status."), labels: [("route", route), ("status", String(status))]).increment()
    }

    /// The text of a scrape.
    func render() -> String {
        let load = engine.load
        queueLength.set(Double(load.queued))
        activeSequences.set(Double(load.active))
        advance(generatedTokens, "generated", to: Double(load.generatedTokens))
        advance(promptTokens, "prompt", to: Double(load.promptTokens))
        advance(steps, "steps", to: Double(load.steps))
        let rate: Double = lastScrape.withLock { last in
            defer { last = (.now, load.generatedTokens) }
            guard let (then, tokens) = last else { return 0 }
            let seconds = secondsSince(then)
            return seconds > 0 ? Double(load.generatedTokens - tokens) / seconds : 0
        }
        tokensPerSecond.set(rate)
        let usage = engine.expertUsage.snapshot
        hitRate.set(usage.hitRate)
        advance(cpuExpertSeconds, "cpu", to: usage.cpuSeconds)
        advance(gpuExpertSeconds, "gpu", to: usage.gpuSeconds)
        for (category, bytes) in gpuMemory?() ?? [:] {
            registry.makeGauge(descriptor: Self.named("gpu_memory", "bytes", "GPU memory Duet holds, by category."), labels: [("category", category)]).set(Double(bytes))
        }
        return registry.emitToString()
    }

    /// Moves a counter up to a running total read from the engine.
    private func advance(_ counter: Counter, _ key: String, to total: Double) {
        let delta = counted.withLock { seen in
            defer { seen[key] = max(total, seen[key] ?? 0) }
            return total - (seen[key] ?? 0)
        }
        if delta > 0 { counter.increment(by: delta) }
    }

    private static func named(_ base: String, _ unit: String, _ help: String) -> MetricNameDescriptor {
        MetricNameDescriptor(namespace: "duet", metricName: base, unitName: unit, helpText: help)
    }
}
