/// Template source -> text and tag segments, with Jinja's whitespace control as
/// transformers configures it: `trim_blocks` (the newline after a block tag goes),
/// `lstrip_blocks` (spaces and tabs before a block tag on its line go), and the
/// `{%-` / `-%}` / `{{-` / `-}}` markers (all whitespace on that side goes).
enum TemplateSegment {
    case text(String)
    case expression(String, line: Int)
    case statement(String, line: Int)
}

func templateSegments(_ source: String) throws(TemplateError) -> [TemplateSegment] {
    let s = Array(source.unicodeScalars)
    var out: [TemplateSegment] = []
    var text: [Unicode.Scalar] = []
    var i = 0, line = 1
    var stripNextText = false, trimNextNewline = false

    func flushText() {
        if !text.isEmpty { out.append(.text(String(String.UnicodeScalarView(text)))) }
        text = []
    }

    while i < s.count {
        let isTag = s[i] == "{" && i + 1 < s.count && (s[i + 1] == "{" || s[i + 1] == "%" || s[i + 1] == "#")
        if !isTag {
            if stripNextText && s[i].properties.isWhitespace { if s[i] == "\n" { line += 1 }; i += 1; continue }
            stripNextText = false
            if trimNextNewline {
                trimNextNewline = false
                if s[i] == "\n" { line += 1; i += 1; continue }
                if s[i] == "\r" && i + 1 < s.count && s[i + 1] == "\n" { line += 1; i += 2; continue }
            }
            if s[i] == "\n" { line += 1 }
            text.append(s[i])
            i += 1
            continue
        }
        stripNextText = false
        trimNextNewline = false
        let kind = s[i + 1]
        let tagLine = line
        var j = i + 2
        let leftStrip = j < s.count && s[j] == "-"
        let leftKeep = j < s.count && s[j] == "+"
        if leftStrip || leftKeep { j += 1 }
        // The closing delimiter, skipping quoted strings inside expressions and statements.
        let close: Unicode.Scalar = kind == "{" ? "}" : kind == "%" ? "%" : "#"
        var k = j
        var quote: Unicode.Scalar? = nil
        var found = -1
        while k + 1 < s.count {
            let c = s[k]
            if c == "\n" { line += 1 }
            if let q = quote {
                if c == "\\" { k += 2; continue }
                if c == q { quote = nil }
            } else if kind != "#" && (c == "'" || c == "\"") {
                quote = c
            } else if c == close && s[k + 1] == "}" {
                found = k
                break
            }
            k += 1
        }
        guard found >= 0 else { throw .syntax("unclosed tag '{\(kind)'", line: tagLine) }
        let rightStrip = found > j && s[found - 1] == "-"
        let body = String(String.UnicodeScalarView(s[j..<(rightStrip ? found - 1 : found)]))
        if leftStrip {
            while let last = text.last, last.properties.isWhitespace { text.removeLast() }
        } else if kind != "{" && !leftKeep {
            // lstrip_blocks: only spaces/tabs between the line start and the tag.
            var n = text.count
            while n > 0 && (text[n - 1] == " " || text[n - 1] == "\t") { n -= 1 }
            if n == 0 ? out.isEmpty || endsWithNewline(out) : text[n - 1] == "\n" { text.removeSubrange(n...) }
        }
        flushText()
        switch kind {
        case "{": out.append(.expression(body, line: tagLine))
        case "%": out.append(.statement(body, line: tagLine))
        default: break  // comment
        }
        i = found + 2
        if rightStrip { stripNextText = true } else if kind != "{" { trimNextNewline = true }
    }
    flushText()
    return out
}

/// Whether the text emitted so far ends a line (for lstrip_blocks at a segment boundary).
private func endsWithNewline(_ segments: [TemplateSegment]) -> Bool {
    for seg in segments.reversed() {
        if case .text(let t) = seg { return t.unicodeScalars.last == "\n" }
        return false
    }
    return true
}

/// Tokens of one expression or statement body.
enum Token: Equatable {
    case name(String)
    case string(String)
    case int(Int)
    case double(Double)
    case op(String)
    case end
}

func tokenize(_ body: String, line: Int) throws(TemplateError) -> [Token] {
    let s = Array(body.unicodeScalars)
    var out: [Token] = []
    var i = 0
    let twoChar: Set<String> = ["==", "!=", "<=", ">=", "//", "**"]
    while i < s.count {
        let c = s[i]
        if c.properties.isWhitespace { i += 1; continue }
        if c == "'" || c == "\"" {
            var v = String.UnicodeScalarView()
            var j = i + 1
            while j < s.count && s[j] != c {
                if s[j] == "\\" && j + 1 < s.count {
                    j += 1
                    switch s[j] {
                    case "n": v.append("\n")
                    case "t": v.append("\t")
                    case "r": v.append("\r")
                    case "\\": v.append("\\")
                    case "'": v.append("'")
                    case "\"": v.append("\"")
                    default: v.append("\\"); v.append(s[j])
                    }
                } else {
                    v.append(s[j])
                }
                j += 1
            }
            guard j < s.count else { throw .syntax("unterminated string", line: line) }
            out.append(.string(String(v)))
            i = j + 1
            continue
        }
        if c.properties.numericType != nil && c.isASCII {
            var j = i
            while j < s.count && s[j].isASCII && (s[j].properties.numericType != nil || s[j] == "_") { j += 1 }
            var isFloat = false
            if j + 1 < s.count && s[j] == "." && s[j + 1].properties.numericType != nil {
                isFloat = true
                j += 1
                while j < s.count && s[j].isASCII && s[j].properties.numericType != nil { j += 1 }
            }
            let text = String(String.UnicodeScalarView(s[i..<j])).replacing("_", with: "")
            out.append(isFloat ? .double(Double(text)!) : .int(Int(text) ?? 0))
            i = j
            continue
        }
        if c == "_" || c.properties.isAlphabetic {
            var j = i
            while j < s.count && (s[j] == "_" || s[j].properties.isAlphabetic || (s[j].isASCII && s[j].properties.numericType != nil)) { j += 1 }
            out.append(.name(String(String.UnicodeScalarView(s[i..<j]))))
            i = j
            continue
        }
        if i + 1 < s.count, twoChar.contains(String(c) + String(s[i + 1])) {
            out.append(.op(String(c) + String(s[i + 1])))
            i += 2
            continue
        }
        guard "()[]{},:.|~+-*/%<>=".unicodeScalars.contains(c) else {
            throw .syntax("unexpected character '\(c)'", line: line)
        }
        out.append(.op(String(c)))
        i += 1
    }
    out.append(.end)
    return out
}
