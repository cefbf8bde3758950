import RemusCore
import RemusNetbuf
import RemusSystem
import RemusXen

/// Builds the Xen backend's primary and replica for the backend factory.
enum XenBackend {
    /// Checks this is a dom0 of the Xen release this build is for, opens the domain (PV, PVH
    /// or HVM; a PV guest is refused where the hypervisor has no shadow paging) and buffers its
    /// vifs: plug qdiscs on every vif of the domain (guest egress is dom0 ingress on the vif),
    /// unless output is not held (`--unsafe --no-netbuf`). Nothing is changed on the domain
    /// when this throws. Once protection is over the guest runs on here without its
    /// checkpointed save and with its vifs unbuffered again.
    ///
    /// With `--xen-disk`, each disk is served as its NBD device first (the domain is created on
    /// it, `--wait-for-domain`), and a domain that writes to a disk not served here is refused
    /// (I9). A domain that runs on the served devices keeps them served until it is gone, also
    /// when this throws and after protection ended.
    static func openPrimary(_ config: ProtectConfiguration) throws -> OpenedGuest {
        let domain = config.domain
        // remusd's own Xen steps: the choices at info (e.g. how the guest is suspended), every
        // step with REMUSD_XEN_DEBUG=1 (the testbed's logs).
        let debug = ProcessEnvironment.current["REMUSD_XEN_DEBUG"].map { !$0.isEmpty && $0 != "0" } ?? false
        let log = XenLog(echoLevel: .error, noteEchoLevel: debug ? .debug : .info)
        do {
            _ = try XenHost.detect(log: log)
        } catch {
            throw ProtocolError("\(error) Nothing was changed on domain '\(domain)'. See Docs/xen.md, or use --backend sim for the simulated guest.")
        }
        // The disks first: a domain that uses them is created on the devices they are served as.
        let served = config.xenDisks.isEmpty ? nil : try XenServedDisks(config.xenDisks)
        let guest: XenPrimaryGuest
        do {
            if config.waitForDomainMs > 0 {
                Log.info("waiting up to \(config.waitForDomainMs / 1000) s for domain '\(domain)' to appear" + (served.map { " (create it on \($0.disks.map { "phy:\($0.device),\($0.vdev),w" }.joined(separator: " "))" } ?? ""))
                let deadline = monotonicNanoseconds() + UInt64(config.waitForDomainMs) * 1_000_000
                guard try XenPrimaryGuest.waitForDomain(named: domain, log: log, untilMonotonic: deadline) else {
                    throw ProtocolError("domain '\(domain)' was not created and booted within \(config.waitForDomainMs / 1000) s (--wait-for-domain: 'xl create' finished and its PV devices connected); nothing was protected — create it, or give it longer")
                }
            }
            guest = try XenPrimaryGuest(domain: domain, log: log)
            // Every disk the guest can write must be one served here (I9).
            let disks = try XenDomainDisks.list(guest.domainConfig().bytes)
            try XenDomainDisks.checkServed(disks, served: served?.served ?? [:], domain: domain)
        } catch {
            if let served {
                // Refused; a domain of that name may run (or be being created) on the devices
                // served here: they stay served until it is gone.
                if let exists = try? XenPrimaryGuest.existence(of: domain, log: log), exists() {
                    Log.error("\(error)")
                    served.serveUntilGone(domain: domain, isGone: { !exists() })
                } else {
                    served.detach()
                }
            }
            throw error
        }
        guest.replicatedDisks = served?.journal
        do {
            return try buffer(guest, config: config, closing: served)
        } catch {
            // The domain runs on the served devices: its disk stays served while it runs.
            if let served {
                Log.error("\(error)")
                served.serveUntilGone(domain: domain, isGone: { guest.hasVanished })
            }
            throw error
        }
    }

    /// Buffers the opened guest's vifs; the guest, its output and what closes them.
    private static func buffer(_ guest: XenPrimaryGuest, config: ProtectConfiguration, closing served: XenServedDisks?) throws -> OpenedGuest {
        let domain = config.domain
        let output: any OutputBuffer
        let plug: PlugOutputBuffer?
        if config.unsafeNoNetbuf {
            (output, plug) = (UnbufferedOutput(), nil)
        } else {
            let vifs = xenVifInterfaces(domid: guest.domid)
            guard !vifs.isEmpty else {
                throw ProtocolError("domain '\(domain)' (id \(guest.domid)) has no vif in dom0 (/sys/class/net/vif\(guest.domid).*): there is no network output to hold. Give it a vif, or pass --unsafe --no-netbuf if it truly has no network; nothing was changed")
            }
            do {
                let buffer = try PlugOutputBuffer(interfaces: vifs, limitBytes: config.netbufLimitBytes)
                (output, plug) = (buffer, buffer)
            } catch {
                throw ProtocolError("\(error); nothing was changed on domain '\(domain)' (its vifs \(vifs.joined(separator: ", ")) are not buffered)")
            }
        }
        let held = plug.map { p in p.attachments.map { "\($0.interface) (\($0.ifbName))" }.joined(separator: ", ") }
        Log.info("protecting \(guest.summary), Xen domain id \(guest.domid); " + (held.map { "output held by plug qdiscs on \($0)" } ?? "output NOT held (--unsafe --no-netbuf)"))
        return OpenedGuest(guest: guest, output: output, close: {
            guest.endProtection()
            if let plug {
                do { _ = try plug.teardown() } catch { Log.error("removing the plug qdiscs failed: \(error); 'remusd netbuf cleanup' removes them") }
            }
            served?.serveUntilGone(domain: domain, isGone: { guest.hasVanished })
        })
    }

    /// An empty replica; the primary's stream header and configuration build the domain.
    static func makeReplica() throws -> XenReplica {
        do {
            return try XenReplica(log: XenLog(echoLevel: .error))
        } catch {
            throw ProtocolError("this backup cannot receive a Xen guest: \(error). It must run as root in dom0 of Xen \(XenLibraries.release) with xenstored running (see Docs/xen.md)")
        }
    }
}

/// Output that is never held (`--unsafe --no-netbuf` on a Xen domain): the vifs pass packets
/// as they come.
final class UnbufferedOutput: OutputBuffer {
    func closeEpoch(_ epoch: Epoch) throws {}
    func release(through epoch: Epoch) throws {}
    func releaseAll() throws {}
    func hold() throws {}
    func statistics() throws -> OutputStatistics { OutputStatistics() }
}
