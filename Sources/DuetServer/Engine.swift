import Dispatch
import DuetCore
import DuetModels
import DuetRuntime
import Synchronization

/// The model behind the server: one thread drives a `ContinuousBatcher`, so every request
/// in flight shares its forward steps (continuous batching). Requests come in from any task
/// through `submit`, and each gets back a stream of its own sequences' events, routed by
/// sequence id, so tokens never cross between requests. Ending a stream early (a client
/// that disconnects) cancels its sequences, which frees their KV blocks before the next step.
public final class InferenceEngine: Sendable {
    /// One choice of a request.
    public struct Submission: Sendable {
        public var prompt: [Int32]
        public var options: GenerationOptions
        public var topLogprobs: Int?
        public init(prompt: [Int32], options: GenerationOptions, topLogprobs: Int? = nil) {
            self.prompt = prompt
            self.options = options
            self.topLogprobs = topLogprobs
        }
    }

    /// An event of choice `choice` of a request.
    public struct Event: Sendable {
        public var choice: Int
        public var event: SequenceEvent
    }

    /// What the metrics read.
    public struct Load: Sendable, Equatable {
        public var queued = 0
        public var active = 0
        public var generatedTokens = 0
        public var promptTokens = 0
        public var steps = 0
        public var stepSeconds = 0.0
    }

    public let maxPositions: Int
    public let vocabSize: Int
    /// Positions the KV cache holds for one sequence alone (nil: unbounded).
    public let cacheCapacityTokens: Int?
    public let maxConcurrency: Int
    public let expertUsage: ExpertUsage

    /// Everything the engine thread and the request tasks share.
    private struct Shared {
        var inbox: [BatchRequest] = []
        var cancels: [String] = []
        var groups: [Int: Group] = [:]
        var nextGroup = 0
        var stopping = false
        var load = Load()
    }

    /// A request's stream and the choices still running.
    private struct Group {
        var continuation: AsyncStream<Event>.Continuation
        var running: Set<Int>
    }

    private let shared = Mutex(Shared())
    private let wake = DispatchSemaphore(value: 0)
    private let stopped = DispatchSemaphore(value: 0)
    /// Only the engine thread touches it after `init`.
    private nonisolated(unsafe) let batcher: ContinuousBatcher

    public init(model: any LanguageModel, maxConcurrency: Int, cacheMemoryLimit: Int?) {
        batcher = ContinuousBatcher(model: model, maxSequences: maxConcurrency, cacheMemoryLimit: cacheMemoryLimit)
        maxPositions = model.maxPositions
        vocabSize = model.vocabSize
        cacheCapacityTokens = batcher.cacheCapacityTokens
        self.maxConcurrency = batcher.maxSequences
        expertUsage = model.expertUsage
        let thread = DispatchQueue(label: "duet.engine", qos: .userInitiated)
        thread.async { [self] in loop() }
    }

    /// Positions a sequence may fill: the model's context, and the KV cache's room for one sequence.
    public var capacityTokens: Int { min(maxPositions, cacheCapacityTokens ?? Int.max) }

    public var load: Load { shared.withLock { $0.load } }

    /// A submitted request: its events, and a way to stop all or one of its choices.
    public struct Handle: Sendable {
        public let events: AsyncStream<Event>
        let engine: InferenceEngine
        let group: Int
        let choices: Int
        /// Stops every choice (the client went away).
        public func cancel() { engine.cancel(group: group, choices: 0..<choices) }
        /// Stops one choice (it hit a stop string); the stream ends when the others end.
        public func cancel(choice: Int) { engine.cancel(group: group, choices: choice..<(choice + 1)) }
    }

    /// Queues the choices of one request; their events arrive on the handle's stream, which
    /// ends after every choice has finished, failed or been cancelled. A consumer that stops
    /// listening (its task cancelled) cancels them all.
    public func submit(_ choices: [Submission]) -> Handle {
        let (stream, continuation) = AsyncStream<Event>.makeStream()
        let group: Int? = shared.withLock { s in
            guard !s.stopping else { return nil }
            let g = s.nextGroup
            s.nextGroup += 1
            s.groups[g] = Group(continuation: continuation, running: Set(0..<choices.count))
            for (i, c) in choices.enumerated() {
                s.inbox.append(BatchRequest(id: Self.sequenceID(group: g, choice: i), prompt: c.prompt, options: c.options,
                                            topLogprobs: c.topLogprobs))
            }
            return g
        }
        guard let group else {
            continuation.yield(Event(choice: 0, event: .failed(.cacheFull("the server is shutting down"))))
            continuation.finish()
            return Handle(events: stream, engine: self, group: -1, choices: 0)
        }
        continuation.onTermination = { [weak self] reason in
            if case .cancelled = reason { self?.cancel(group: group, choices: 0..<choices.count) }
        }
        wake.signal()
        return Handle(events: stream, engine: self, group: group, choices: choices.count)
    }

    /// Stops the thread: queued and running sequences end as failed. Waits for the thread.
    public func shutdown() {
        let already = shared.withLock { s in
            defer { s.stopping = true }
            return s.stopping
        }
        guard !already else { return }
        wake.signal()
        stopped.wait()
    }

    private func cancel(group: Int, choices: Range<Int>) {
        shared.withLock { s in
            guard var entry = s.groups[group] else { return }
            for i in choices where entry.running.remove(i) != nil {
                s.cancels.append(Self.sequenceID(group: group, choice: i))
            }
            if entry.running.isEmpty {
                s.groups[group] = nil
                entry.continuation.finish()
            } else {
                s.groups[group] = entry
            }
        }
        wake.signal()
    }

    private static func sequenceID(group: Int, choice: Int) -> String { "\(group)#\(choice)" }

    private static func parse(_ id: String) -> (group: Int, choice: Int) {
        let parts = id.split(separator: "#")
        return (Int(parts[0]) ?? -1, Int(parts[1]) ?? 0)
    }

    // MARK: the engine thread

    private func loop() {
        while true {
            let (inbox, cancels, stopping) = shared.withLock { s in
                defer { s.inbox = []; s.cancels = [] }
                return (s.inbox, s.cancels, s.stopping)
            }
            for request in inbox { batcher.enqueue(request) }
            for id in cancels { batcher.cancel(id: id) }
            if stopping { return drainOnStop() }
            if batcher.isIdle {
                publishLoad(stepSeconds: nil)
                wake.wait()
                continue
            }
            let start = ContinuousClock.now
            // Only ModelErrors come out of the batcher, as events; the closure does not throw.
            try? batcher.step { request, event in deliver(request, event) }
            publishLoad(stepSeconds: secondsSince(start))
        }
    }

    /// Routes one event to its request's stream; the stream ends with its last choice.
    private func deliver(_ request: BatchRequest, _ event: SequenceEvent) {
        let (group, choice) = Self.parse(request.id)
        shared.withLock { s in
            switch event {
            case .token: s.load.generatedTokens += 1
            case .finished, .failed: s.load.promptTokens += request.prompt.count
            }
            guard var entry = s.groups[group], entry.running.contains(choice) else { return }  // cancelled meanwhile
            entry.continuation.yield(Event(choice: choice, event: event))
            if case .token = event { return }
            entry.running.remove(choice)
            if entry.running.isEmpty {
                s.groups[group] = nil
                entry.continuation.finish()
            } else {
                s.groups[group] = entry
            }
        }
    }

    private func publishLoad(stepSeconds: Double?) {
        let queued = batcher.queuedCount, active = batcher.activeCount
        shared.withLock { s in
            // What is still in the inbox counts as queued too.
            s.load.queued = queued + s.inbox.count
            s.load.active = active
            if let stepSeconds { s.load.steps += 1; s.load.stepSeconds += stepSeconds }
        }
    }

    private func drainOnStop() {
        let groups = shared.withLock { s in
            defer { s.groups = [:] }
            return s.groups
        }
        for (_, entry) in groups {
            entry.continuation.yield(Event(choice: 0, event: .failed(.cacheFull("the server is shutting down"))))
            entry.continuation.finish()
        }
        stopped.signal()
    }
}
