import ArgumentParser
import RemusRuntime
import RemusTLS

/// `remusd certs <dir> [name[=alt,alt]]…`
struct Certs: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Make a throwaway CA and host certificates for the replication channel's mutual TLS.",
        discussion: """
            Writes ca.pem and ca.key (the CA; kept, and reused by later runs on the same directory so a host can be renewed or added) and <name>.pem with <name>.key for each name (default: primary and backup). Keys are ECDSA P-256, written 0600; certificates serve as TLS client and server certificates. A name may carry more names it answers to, DNS names or IP addresses: 'backup=10.0.0.2,backup.lan'. The primary checks the backup's certificate against the host it dials (or --tls-peer-name), so give the backup the address the primary uses. Keep ca.key off the hosts; each host needs ca.pem and its own pair. See Docs/security.md.
            """)

    @Argument(help: ArgumentHelp("Directory for the files (created, 0700).", valueName: "dir"))
    var directory: String

    @Argument(help: ArgumentHelp("Hosts to make certificates for: name, or name=alt,alt (DNS names or IP addresses).", valueName: "name"))
    var names: [String] = ["primary", "backup"]

    @Option(help: ArgumentHelp("How long the host certificates are valid.", valueName: "days"))
    var days: Int = 365

    func validate() throws {
        for name in names where CertificateSet.Host(parsing: name) == nil {
            throw ValidationError("'\(name)' is not name or name=alt,alt (letters, digits, '-', '.', '_'; alternatives are DNS names or IP addresses)")
        }
        if days < 1 || days > 3650 { throw ValidationError("--days must be between 1 and 3650, got \(days)") }
    }

    func run() throws {
        let hosts = names.compactMap(CertificateSet.Host.init(parsing:))
        let set = CertificateSet(directory: directory)
        let madeCA = try set.make(hosts, validity: .init(notAfterSeconds: days * 86_400))
        print(madeCA ? "made a new CA: \(set.caCertificate) (its key \(set.caKey) signs every host: keep it off them)"
                     : "reused the CA in \(directory)")
        for host in hosts {
            let f = set.files(for: host.name)
            print("\(host.name): --tls-cert \(f.certificate) --tls-key \(f.key) --tls-ca \(f.ca)")
        }
    }
}
