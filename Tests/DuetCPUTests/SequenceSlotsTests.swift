import DuetCore
import Testing

/// The slot bookkeeping of a device that keeps each sequence's keys and values (beam search
/// with the dense layers on the GPU): forks take over a gone parent's slot or get a copy.
@Suite struct SequenceSlotsTests {
    func cache(_ pool: KVBlockPool, length: Int) -> KVCache {
        let c = KVCache(pool: pool)
        c.advance(length)
        return c
    }

    @Test func forksCopyFromALiveParentAndTakeOverAGoneOne() throws {
        let pool = KVBlockPool(layers: 1, kvHeads: 1, headDim: 4)
        var slots = SequenceSlots(count: 4)
        let base = cache(pool, length: 0)
        #expect(try slots.assign([base]) == ([0], []))  // the prompt's step
        base.advance(5)
        // Step 1: three beams forked from the prompt, which stays alive: three copies.
        var beams = [base.fork(), base.fork(), base.fork()]
        let first = try slots.assign(beams)
        #expect(first.slots == [1, 2, 3])
        #expect(first.copies == [.init(from: 0, to: 1, rows: 5), .init(from: 0, to: 2, rows: 5), .init(from: 0, to: 3, rows: 5)])
        for b in beams { b.advance(1) }
        // Step 2: beam 0 has two children, beam 1 one, beam 2 none; the parents are gone.
        beams = [beams[0].fork(), beams[0].fork(), beams[1].fork()]
        let second = try slots.assign(beams)
        // The first child of each parent takes its slot; the second child of beam 0 gets the
        // slot beam 2 left, with beam 0's six rows copied in (beam 0's slot is not reused).
        #expect(second.slots == [1, 3, 2])
        #expect(second.copies == [.init(from: 1, to: 3, rows: 6)])
        // The same caches again keep their slots, with nothing to copy.
        #expect(try slots.assign(beams) == ([1, 3, 2], []))
    }

    @Test func outOfSlotsAndUnknownSequencesAreErrors() throws {
        let pool = KVBlockPool(layers: 1, kvHeads: 1, headDim: 4)
        var slots = SequenceSlots(count: 2)
        let a = cache(pool, length: 0), b = cache(pool, length: 0), c = cache(pool, length: 0)
        #expect(throws: SequenceSlots.SlotError.full(2)) { try slots.assign([a, b, c]) }
        var fresh = SequenceSlots(count: 2)
        #expect(throws: SequenceSlots.SlotError.unknown(length: 3)) { try fresh.assign([cache(pool, length: 3)]) }
        // A one-slot model serves whichever sequence came last; the one it evicted is then unknown.
        var one = SequenceSlots(count: 1)
        let first = cache(pool, length: 0)
        _ = try one.assign([first], evicting: true)
        first.advance(4)
        #expect(try one.assign([b], evicting: true).slots == [0])
        #expect(throws: SequenceSlots.SlotError.unknown(length: 4)) { try one.assign([first], evicting: true) }
    }
}
