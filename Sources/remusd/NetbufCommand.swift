import ArgumentParser

/// `remusd netbuf …`: network output buffering maintenance (owned by the netbuf work).
struct Netbuf: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Inspect and clean up network output buffers (plug qdiscs on ifb devices).")
}
