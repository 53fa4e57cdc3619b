/// Marks a value as safe to share across threads when the code using it guarantees that
/// (disjoint writes per task, read-only data). The one wrapper Duet uses for raw pointers
/// crossing into parallel work.
public struct Unchecked<Value>: @unchecked Sendable {
    public let value: Value
    public init(_ value: Value) { self.value = value }
}
