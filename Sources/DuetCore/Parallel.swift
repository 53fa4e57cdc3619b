import Dispatch

/// Marks a value as safe to share across threads when the code using it guarantees that
/// (disjoint writes per worker, read-only data). The one wrapper Duet uses for raw
/// pointers crossing into parallel work.
public struct Unchecked<Value>: @unchecked Sendable {
    public let value: Value
    public init(_ value: Value) { self.value = value }
}

/// Runs `body(i)` for `i` in `0..<count`, in parallel when `count > 1`.
/// Each index must touch disjoint output. (The persistent thread pool replaces this
/// implementation; callers do not change.)
public func parallelFor(_ count: Int, _ body: (Int) -> Void) {
    if count <= 1 {
        if count == 1 { body(0) }
        return
    }
    withoutActuallyEscaping(body) { body in
        let shared = Unchecked(body)
        DispatchQueue.concurrentPerform(iterations: count) { i in shared.value(i) }
    }
}
