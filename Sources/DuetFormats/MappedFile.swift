#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// A whole file mapped read-only into memory. Pages are read on first touch, so mapping a
/// checkpoint costs nothing until a tensor is used.
public final class MappedFile: @unchecked Sendable {
    public let path: String
    public let size: Int
    /// nil for an empty file.
    public let base: UnsafeRawPointer?

    public init(path: String) throws(CheckpointError) {
        let fd = open(path, O_RDONLY)
        guard fd >= 0 else {
            if errno == ENOENT { throw .fileNotFound(path: path) }
            throw .unreadable(path: path, reason: String(cString: strerror(errno)))
        }
        defer { close(fd) }
        var st = stat()
        guard fstat(fd, &st) == 0 else { throw .unreadable(path: path, reason: String(cString: strerror(errno))) }
        guard (st.st_mode & S_IFMT) == S_IFREG else { throw .unreadable(path: path, reason: "not a regular file") }
        self.path = path
        self.size = Int(st.st_size)
        if size == 0 {
            base = nil
            return
        }
        let p = mmap(nil, size, PROT_READ, MAP_PRIVATE, fd, 0)
        guard let p, p != MAP_FAILED else { throw .unreadable(path: path, reason: "mmap failed: \(String(cString: strerror(errno)))") }
        base = UnsafeRawPointer(p)
    }

    deinit {
        if let base { munmap(UnsafeMutableRawPointer(mutating: base), size) }
    }

    /// The bytes `[offset, offset + count)`; the caller has checked the range.
    public func bytes(_ offset: Int, _ count: Int) -> UnsafeRawBufferPointer {
        UnsafeRawBufferPointer(start: base?.advanced(by: offset), count: count)
    }
}

/// The whole contents of a small file (config, index, tokenizer), or a typed error.
public func readSmallFile(_ path: String) throws(CheckpointError) -> [UInt8] {
    let map = try MappedFile(path: path)
    return Array(map.bytes(0, map.size))
}

/// Whether a regular file exists at `path`.
public func fileExists(_ path: String) -> Bool {
    var st = stat()
    return stat(path, &st) == 0 && (st.st_mode & S_IFMT) == S_IFREG
}

/// `directory/name`, without doubling a trailing slash.
public func joinPath(_ directory: String, _ name: String) -> String {
    directory.hasSuffix("/") ? directory + name : directory + "/" + name
}
