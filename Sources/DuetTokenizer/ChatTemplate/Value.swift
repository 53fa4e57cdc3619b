/// A value inside the template interpreter, with Python's semantics where Jinja follows
/// them (truthiness, `+`, comparisons, printing).
indirect enum TemplateValue {
    case undefined(String)          // a missing name or key (prints as "", is falsy)
    case none
    case bool(Bool)
    case int(Int)
    case double(Double)
    case string(String)
    case list([TemplateValue])
    case dict(OrderedDict)
    case namespace(Namespace)
    case function(String, ([TemplateValue], [(String, TemplateValue)]) throws(TemplateError) -> TemplateValue)
    case loop(LoopInfo)

    /// Keys in insertion order (tools and tool calls are printed with tojson in order).
    struct OrderedDict {
        var keys: [String] = []
        var values: [String: TemplateValue] = [:]
        subscript(key: String) -> TemplateValue? {
            get { values[key] }
            set {
                if values[key] == nil { keys.append(key) }
                values[key] = newValue
            }
        }
    }

    /// `namespace(...)`: the one mutable object templates have (`set ns.x = ...`).
    final class Namespace {
        var attributes = OrderedDict()
    }

    struct LoopInfo {
        var index0: Int
        var length: Int
    }

    init(json: JSONValue) {
        switch json {
        case .null: self = .none
        case .bool(let b): self = .bool(b)
        case .number(let n): self = n == n.rounded() && abs(n) < 1e15 ? .int(Int(n)) : .double(n)
        case .string(let s): self = .string(s)
        case .array(let a): self = .list(a.map(TemplateValue.init(json:)))
        case .object(let o):
            var d = OrderedDict()
            for k in o.keys.sorted() { d[k] = TemplateValue(json: o[k]!) }
            self = .dict(d)
        }
    }

    var isTruthy: Bool {
        switch self {
        case .undefined, .none: false
        case .bool(let b): b
        case .int(let i): i != 0
        case .double(let d): d != 0
        case .string(let s): !s.isEmpty
        case .list(let l): !l.isEmpty
        case .dict(let d): !d.keys.isEmpty
        case .namespace, .function, .loop: true
        }
    }

    var isDefined: Bool { if case .undefined = self { return false }; return true }

    /// What `{{ value }}` prints (Python's str()).
    var printed: String {
        switch self {
        case .undefined: ""
        case .string(let s): s
        default: repr(quote: false)
        }
    }

    /// Python's repr (strings quoted) — for printing lists and dicts.
    func repr(quote: Bool = true) -> String {
        switch self {
        case .undefined: ""
        case .none: "None"
        case .bool(let b): b ? "True" : "False"
        case .int(let i): String(i)
        case .double(let d): pythonFloat(d)
        case .string(let s): quote ? "'" + s.replacing("\\", with: "\\\\").replacing("'", with: "\\'") + "'" : s
        case .list(let l): "[" + l.map { $0.repr() }.joined(separator: ", ") + "]"
        case .dict(let d): "{" + d.keys.map { "'\($0)': \(d.values[$0]!.repr())" }.joined(separator: ", ") + "}"
        case .namespace: "<Namespace>"
        case .function(let name, _): "<function \(name)>"
        case .loop: "<LoopContext>"
        }
    }

    var typeName: String {
        switch self {
        case .undefined: "undefined"
        case .none: "none"
        case .bool: "bool"
        case .int: "int"
        case .double: "float"
        case .string: "string"
        case .list: "list"
        case .dict: "dict"
        case .namespace: "namespace"
        case .function: "function"
        case .loop: "loop"
        }
    }
}

/// Python's float repr for the values templates print (shortest round-trip, ".0" for integers).
func pythonFloat(_ d: Double) -> String {
    if d.isNaN { return "nan" }
    if d.isInfinite { return d > 0 ? "inf" : "-inf" }
    var s = "\(d)"
    if s.hasSuffix(".0") || s.contains("e") || s.contains(".") { } else { s += ".0" }
    return s
}

extension TemplateValue: Equatable {
    static func == (a: TemplateValue, b: TemplateValue) -> Bool {
        switch (a, b) {
        case (.undefined, .undefined), (.none, .none): true
        case (.bool(let x), .bool(let y)): x == y
        case (.int(let x), .int(let y)): x == y
        case (.int(let x), .double(let y)), (.double(let y), .int(let x)): Double(x) == y
        case (.double(let x), .double(let y)): x == y
        case (.bool(let x), .int(let y)), (.int(let y), .bool(let x)): (x ? 1 : 0) == y
        case (.string(let x), .string(let y)): x == y
        case (.list(let x), .list(let y)): x == y
        case (.dict(let x), .dict(let y)): Set(x.keys) == Set(y.keys) && x.keys.allSatisfy { x.values[$0] == y.values[$0] }
        case (.namespace(let x), .namespace(let y)): x === y
        default: false
        }
    }
}
