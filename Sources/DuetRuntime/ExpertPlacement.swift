#if canImport(FoundationEssentials)
import FoundationEssentials
#else
import Foundation
#endif
import DuetCPU
import DuetFormats

/// One expert of one layer.
public struct ExpertKey: Hashable, Sendable, Comparable, Codable {
    public var layer: Int
    public var expert: Int
    public init(layer: Int, expert: Int) {
        self.layer = layer
        self.expert = expert
    }
    public static func < (a: ExpertKey, b: ExpertKey) -> Bool { (a.layer, a.expert) < (b.layer, b.expert) }
}

/// How often the router picked each expert while a set of prompts ran (`duet profile`):
/// the input of popularity placement.
public struct ExpertProfile: Codable, Sendable, Equatable {
    /// What ran (model directory or synthetic geometry), for the reader.
    public var model: String
    public var layers: Int
    public var experts: Int
    /// Tokens that went through each layer.
    public var tokens: Int
    /// `[L][E]` token-expert picks.
    public var counts: [[Int]]

    public init(model: String, layers: Int, experts: Int) {
        self.model = model
        self.layers = layers
        self.experts = experts
        tokens = 0
        counts = [[Int]](repeating: [Int](repeating: 0, count: experts), count: layers)
    }

    /// Adds one layer's routing decisions (a `routingObserver` callback).
    public mutating func record(layer: Int, _ choices: [ExpertChoice]) {
        if layer == 0 { tokens += choices.count }
        for choice in choices { for e in choice.experts { counts[layer][e] += 1 } }
    }

    public func count(_ key: ExpertKey) -> Int { counts[key.layer][key.expert] }

    public static func load(path: String) throws(PlacementError) -> ExpertProfile {
        let profile: ExpertProfile
        do {
            profile = try JSONDecoder().decode(ExpertProfile.self, from: Data(try readSmallFile(path)))
        } catch {
            throw .badProfile(path: path, reason: "\(error)")
        }
        guard profile.counts.count == profile.layers, profile.counts.allSatisfy({ $0.count == profile.experts && $0.allSatisfy { $0 >= 0 } }) else {
            throw .badProfile(path: path, reason: "counts must be \(profile.layers) rows of \(profile.experts) non-negative numbers")
        }
        return profile
    }

    public func save(path: String) throws {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys]
        try writeFile(Array(try encoder.encode(self)), to: path)
    }

    /// Throws unless the profile was taken on a model of this shape.
    public func check(layers L: Int, experts E: Int, path: String) throws(PlacementError) {
        guard layers == L, experts == E else {
            throw .badProfile(path: path, reason: "taken on a model with \(layers) layers x \(experts) experts, this one has \(L) x \(E)")
        }
    }
}

public enum PlacementError: Error, Equatable, CustomStringConvertible {
    case badProfile(path: String, reason: String)

    public var description: String {
        switch self {
        case .badProfile(let path, let reason): "expert profile \(path): \(reason)"
        }
    }
}

/// Which experts live in device memory: chosen once from the budget, by popularity (a
/// profile) or, without one, in a documented order.
public struct ExpertPlacement: Sendable, Equatable {
    public enum Order: String, Sendable {
        /// Most-picked experts first (ties: lower layer, then lower expert).
        case profile
        /// No profile: expert 0 of every layer, then expert 1 of every layer, ... — every
        /// layer gets the same share (±1), so no layer is all-CPU.
        case layerBalanced = "layer-balanced"
        /// llama.cpp's -ngl: every expert of layer 0, then of layer 1, ... (whole layers).
        case wholeLayers = "whole-layers"
    }

    public let layers: Int
    public let experts: Int
    public let order: Order
    /// Resident experts in placement order (most important first: a smaller budget keeps a prefix).
    public let resident: [ExpertKey]
    private let residentSet: Set<ExpertKey>

    public init(layers: Int, experts: Int, order: Order, resident: [ExpertKey]) {
        self.layers = layers
        self.experts = experts
        self.order = order
        self.resident = resident
        residentSet = Set(resident)
    }

    /// Every expert of `L` layers of `E`, layer by layer.
    public static func allKeys(layers L: Int, experts E: Int) -> [ExpertKey] {
        (0..<L).flatMap { l in (0..<E).map { ExpertKey(layer: l, expert: $0) } }
    }

    /// Every expert of the model, layer by layer.
    public var allKeys: [ExpertKey] { Self.allKeys(layers: layers, experts: experts) }

    /// The first `capacity` experts in `order` (`.profile` needs `profile`).
    public static func make(layers L: Int, experts E: Int, capacity: Int, order: Order, profile: ExpertProfile? = nil) -> ExpertPlacement {
        var all: [ExpertKey] = []
        switch order {
        case .wholeLayers:
            all = allKeys(layers: L, experts: E)
        case .layerBalanced, .profile:
            for e in 0..<E { for l in 0..<L { all.append(ExpertKey(layer: l, expert: e)) } }
        }
        if order == .profile, let profile {
            // Stable sort: ties keep the layer-major order (lower layer, then lower expert).
            all = all.sorted().enumerated().sorted { a, b in
                let ca = profile.count(a.element), cb = profile.count(b.element)
                return ca != cb ? ca > cb : a.offset < b.offset
            }.map(\.element)
        }
        return ExpertPlacement(layers: L, experts: E, order: order, resident: Array(all.prefix(max(0, capacity))))
    }

    public func isResident(_ key: ExpertKey) -> Bool { residentSet.contains(key) }

    /// Resident experts of one layer, ascending.
    public func resident(layer l: Int) -> [Int] { resident.filter { $0.layer == l }.map(\.expert).sorted() }

    /// The first `count` experts of this placement.
    public func prefix(_ count: Int) -> ExpertPlacement {
        ExpertPlacement(layers: layers, experts: experts, order: order, resident: Array(resident.prefix(max(0, count))))
    }

    /// Share of the profile's token-expert picks that land on resident experts.
    public func hitRate(_ profile: ExpertProfile) -> Double {
        let total = profile.counts.joined().reduce(0, +)
        guard total > 0 else { return 0 }
        return Double(resident.reduce(0) { $0 + profile.count($1) }) / Double(total)
    }

    /// Experts of `bytesPerExpert` that fit `budget` after `reserved` bytes.
    public static func capacity(budget: Int, reserved: Int, bytesPerExpert: Int, total: Int) -> Int {
        guard bytesPerExpert > 0, budget > reserved else { return 0 }
        return min(total, (budget - reserved) / bytesPerExpert)
    }
}
