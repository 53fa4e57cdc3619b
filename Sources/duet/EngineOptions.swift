import ArgumentParser
import DuetCore
import DuetModels

/// Options every verb that runs a model shares.
struct EngineOptions: ParsableArguments {
    @Option(name: .long, help: "Hugging Face checkpoint directory (config.json + safetensors).")
    var model: String

    /// Loads the model and reports how long it took.
    func load() throws -> (model: any LanguageModel, seconds: Double) {
        let start = ContinuousClock.now
        let model = try ModelRegistry.load(directory: self.model)
        return (model, secondsSince(start))
    }
}
