import ArgumentParser

/// `remusd`: continuous-checkpointing replication for virtual machines.
@main
struct Remusd: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "remusd",
        abstract: "Keep a running VM alive through the loss of its host by continuous checkpointing.",
        subcommands: [Netbuf.self]
    )
}
