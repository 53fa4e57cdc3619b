import DuetCore

/// One decode step captured as a CUDA graph: the host writes the token and its position into
/// page-locked memory and launches the graph, which copies them up, runs every kernel of the
/// step (each reads the position from device memory) and copies the logits down — one launch
/// and one wait per token instead of ~80 launches, and no gaps between the kernels for the
/// host to fill.
final class DecodeGraph {
    /// Positions a captured step serves: decode attention's per-query kernel keeps a query's
    /// scores in shared memory, sized once at capture (48 KiB: 12288 positions); later
    /// positions take the tiled kernel, launched one by one.
    static func positions(_ maxPositions: Int) -> Int { min(maxPositions, GPUOps.scoreSharedBytes / 4) }

    private let gpu: GPU
    private let graphs: CUDADriver.Graphs
    private var exec: OpaquePointer? = nil
    private var stream: OpaquePointer? = nil
    /// [token, position] on the host (page-locked) and on the device.
    private let hostIn: UnsafeMutablePointer<Int32>
    private let input: DeviceBuffer
    /// The logits `[V]` the graph copies down.
    private let hostOut: UnsafeMutablePointer<Float>
    private let vocabSize: Int
    /// The buffers the captured kernels use, kept for the graph's life.
    private let workspace: GPUMixtral.Workspace
    /// Kernel launches captured (one step's).
    private(set) var kernels = 0

    /// Captures `issue(ids, start, workspace, positions)`: the step's kernels reading the token
    /// id from `ids` and the position from `start` (both one Int32 on the device), writing the
    /// logits into `workspace.out`, launched for up to `positions` positions.
    init(gpu: GPU, workspace: GPUMixtral.Workspace, vocabSize: Int, positions: Int,
         issue: (DeviceBuffer, DeviceBuffer, GPUMixtral.Workspace, Int) throws(CUDAError) -> Void) throws(CUDAError) {
        guard let graphs = gpu.driver.graphs else { throw .unavailable("this CUDA driver cannot capture graphs") }
        let d = gpu.driver
        self.gpu = gpu
        self.graphs = graphs
        self.workspace = workspace
        self.vocabSize = vocabSize
        input = try gpu.allocate(8, category: GPU.workspace)
        var host: UnsafeMutableRawPointer? = nil, out: UnsafeMutableRawPointer? = nil
        try d.check(d.cuMemHostAlloc(&host, 8, 0), "cuMemHostAlloc")
        hostIn = host!.bindMemory(to: Int32.self, capacity: 2)
        try d.check(d.cuMemHostAlloc(&out, vocabSize * 4, 0), "cuMemHostAlloc")
        hostOut = out!.bindMemory(to: Float.self, capacity: vocabSize)
        try d.check(d.cuStreamCreate(&stream, 0), "cuStreamCreate")
        // Capture on the graph's own stream (the GPU's kernels go there meanwhile); relaxed
        // mode, so a kernel module loaded for the first time during capture is allowed.
        let saved = gpu.stream
        gpu.stream = stream
        defer { gpu.stream = saved }
        try d.check(graphs.beginCapture(stream, 2), "cuStreamBeginCapture")  // CU_STREAM_CAPTURE_MODE_RELAXED
        var graph: OpaquePointer? = nil
        do {
            try d.check(d.cuMemcpyHtoDAsync(input.pointer, hostIn, 8, stream), "cuMemcpyHtoDAsync")
            let before = gpu.launches
            try issue(input.view(offset: 0, bytes: 4), input.view(offset: 4, bytes: 4), workspace, positions)
            kernels = gpu.launches - before
            try d.check(d.cuMemcpyDtoHAsync(hostOut, workspace.out.pointer, vocabSize * 4, stream), "cuMemcpyDtoHAsync")
        } catch {
            _ = graphs.endCapture(stream, &graph)
            if graph != nil { _ = graphs.destroyGraph(graph) }
            throw error
        }
        try d.check(graphs.endCapture(stream, &graph), "cuStreamEndCapture")
        defer { _ = graphs.destroyGraph(graph) }
        try d.check(graphs.instantiate(&exec, graph, 0), "cuGraphInstantiateWithFlags")
    }

    /// Runs the step for `token` at `position` and returns its logits `[V]`.
    func run(token: Int32, position: Int) throws(CUDAError) -> [Float] {
        let d = gpu.driver
        hostIn[0] = token
        hostIn[1] = Int32(position)
        try gpu.countLaunch()
        try d.check(graphs.launch(exec, stream), "cuGraphLaunch")
        try d.check(d.cuStreamSynchronize(stream), "cuStreamSynchronize")
        return Array(UnsafeBufferPointer(start: hostOut, count: vocabSize))
    }

    deinit {
        let d = gpu.driver
        if exec != nil { _ = graphs.destroyExec(exec) }
        if stream != nil { _ = d.cuStreamDestroy(stream) }
        _ = d.cuMemFreeHost(hostIn)
        _ = d.cuMemFreeHost(hostOut)
    }
}
