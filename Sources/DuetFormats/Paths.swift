#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// An environment variable, nil when unset or empty.
public func environmentVariable(_ name: String) -> String? {
    guard let value = getenv(name) else { return nil }
    let s = String(cString: value)
    return s.isEmpty ? nil : s
}

/// Where Duet keeps what it can rebuild (compiled kernels, quantized experts), in `name`
/// below `$DUET_CACHE`, else `$XDG_CACHE_HOME/duet`, else `~/.cache/duet`.
public func duetCacheDirectory(_ name: String) -> String {
    let root = environmentVariable("DUET_CACHE") ?? environmentVariable("XDG_CACHE_HOME").map { $0 + "/duet" }
        ?? (environmentVariable("HOME") ?? "/tmp") + "/.cache/duet"
    return joinPath(root, name)
}

/// Creates `directory` and its missing parents (existing ones are fine; failures show up
/// when the caller writes there).
public func makeDirectories(_ directory: String) {
    var partial = directory.hasPrefix("/") ? "" : "."
    for component in directory.split(separator: "/") {
        partial += "/" + component
        mkdir(partial, 0o755)
    }
}
