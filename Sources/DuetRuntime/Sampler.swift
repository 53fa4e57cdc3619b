#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// How the next token is picked from the logits.
public struct SamplingOptions: Sendable, Equatable {
    /// 0 = greedy (argmax); otherwise logits are divided by it before softmax.
    public var temperature: Float = 0
    /// Keep only the k most likely tokens (0 = off).
    public var topK: Int = 0
    /// Keep the smallest set of most likely tokens whose probability reaches p (1 = off).
    public var topP: Float = 1
    /// Seed of the sampler's random stream: the same seed gives the same tokens.
    public var seed: UInt64 = 0

    public init(temperature: Float = 0, topK: Int = 0, topP: Float = 1, seed: UInt64 = 0) {
        self.temperature = temperature
        self.topK = topK
        self.topP = topP
        self.seed = seed
    }

    public var isGreedy: Bool { temperature == 0 || topK == 1 }
}

/// xoshiro256** seeded through splitmix64: fast, reproducible across platforms.
public struct SeededGenerator: RandomNumberGenerator, Sendable {
    private var s: (UInt64, UInt64, UInt64, UInt64)

    public init(seed: UInt64) {
        var z = seed
        func splitmix() -> UInt64 {
            z &+= 0x9E37_79B9_7F4A_7C15
            var x = z
            x = (x ^ (x >> 30)) &* 0xBF58_476D_1CE4_E5B9
            x = (x ^ (x >> 27)) &* 0x94D0_49BB_1331_11EB
            return x ^ (x >> 31)
        }
        s = (splitmix(), splitmix(), splitmix(), splitmix())
    }

    public mutating func next() -> UInt64 {
        let result = ((s.1 &* 5) << 7 | (s.1 &* 5) >> 57) &* 9
        let t = s.1 << 17
        s.2 ^= s.0
        s.3 ^= s.1
        s.1 ^= s.2
        s.0 ^= s.3
        s.2 ^= t
        s.3 = s.3 << 45 | s.3 >> 19
        return result
    }

    /// Uniform in [0, 1) with 53 random bits.
    public mutating func nextUnit() -> Double {
        Double(next() >> 11) * 0x1.0p-53
    }
}

/// Picks tokens from logits: greedy, or temperature -> top-k -> top-p -> sample, in the
/// order HF's `generate` applies its warpers.
public struct Sampler: Sendable {
    public let options: SamplingOptions
    private var rng: SeededGenerator

    public init(_ options: SamplingOptions) {
        self.options = options
        rng = SeededGenerator(seed: options.seed)
    }

    public mutating func sample(_ logits: [Float]) -> Int32 {
        if options.isGreedy { return Int32(argmax(logits)) }
        let probs = candidates(logits)
        var u = rng.nextUnit() * probs.reduce(0) { $0 + $1.p }
        for c in probs {
            u -= c.p
            if u < 0 { return Int32(c.id) }
        }
        return Int32(probs.last!.id)
    }

    /// The tokens left after temperature, top-k and top-p, most likely first, with their
    /// (unnormalised after filtering) probabilities.
    func candidates(_ logits: [Float]) -> [(id: Int, p: Double)] {
        let t = Double(options.temperature)
        var order = logits.indices.sorted { logits[$0] != logits[$1] ? logits[$0] > logits[$1] : $0 < $1 }
        if options.topK > 0 && options.topK < order.count { order.removeLast(order.count - options.topK) }
        let m = Double(logits[order[0]])
        var probs = order.map { (id: $0, p: exp((Double(logits[$0]) - m) / t)) }
        let total = probs.reduce(0) { $0 + $1.p }
        if options.topP < 1 {
            var cumulative = 0.0, keep = 0
            for c in probs {
                cumulative += c.p / total
                keep += 1
                if cumulative >= Double(options.topP) { break }
            }
            probs.removeLast(probs.count - keep)
        }
        return probs
    }
}

/// Index of the largest value; the first one on ties (as torch.argmax).
public func argmax(_ x: [Float]) -> Int {
    var best = 0
    for i in x.indices where x[i] > x[best] { best = i }
    return best
}
