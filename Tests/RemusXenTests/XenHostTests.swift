import CXen
import Glibc
@testable import RemusXen
import Testing

/// All RemusXen suites, one at a time: tests compare the count of open Xen objects before and
/// after, and every suite here opens some (loggers at least).
@Suite("RemusXen", .serialized)
enum RemusXenTests {}

extension RemusXenTests {
@Suite("Xen host detection")
struct XenHostTests {
    /// Runs detection against `paths` and returns why it failed; records an issue if it did not.
    private func unavailable(_ paths: XenHostPaths, sourceLocation: SourceLocation = #_sourceLocation) -> XenUnavailable? {
        do {
            _ = try XenHost.detect(paths: paths)
            Issue.record("detection found Xen where there is none", sourceLocation: sourceLocation)
            return nil
        } catch {
            return error
        }
    }

    @Test("Without Xen, detection says so, names what it looked for, and leaks nothing",
          .enabled(if: !ThisHost.isXenDom0, "this host is a Xen dom0"))
    func noXenOnThisHost() throws {
        let census = XenHandleCensus.count
        let descriptors = xenDeviceDescriptors()
        let error = try #require(unavailable(.system))
        #expect(error.description.hasPrefix("no usable Xen on this host: "))
        #expect(error.description.contains("/sys/hypervisor/type"), "names what it looked for: \(error)")
        #expect(error.description.contains("dom0 of Xen \(XenLibraries.release)"), "says what is needed: \(error)")
        print("XenHost.detect on this host: \(error)")
        #expect(XenHandleCensus.count == census)
        #expect(xenDeviceDescriptors() == descriptors)
    }

    @Test("No hypervisor: the missing sysfs file is named")
    func noHypervisor() throws {
        let root = FakeRoot()
        defer { root.remove() }
        let error = try #require(unavailable(root.paths))
        #expect(error.reason == .noHypervisor)
        #expect(error.summary == "not running under a hypervisor (\(root.path)/sys/hypervisor/type does not exist)")
        #expect(error.observations.map(\.found) == ["no such file"])
    }

    @Test("Another hypervisor is named as such")
    func otherHypervisor() throws {
        let root = FakeRoot()
        defer { root.remove() }
        root.write("/sys/hypervisor/type", "kvm\n")
        let error = try #require(unavailable(root.paths))
        #expect(error.reason == .otherHypervisor("kvm"))
        #expect(error.description.contains("running under \"kvm\", not Xen"))
    }

    @Test("Xen without xenfs, xenfs not mounted, a domU, no privcmd: each is told apart")
    func partialXen() throws {
        let root = FakeRoot()
        defer { root.remove() }
        root.write("/sys/hypervisor/type", "xen\n")
        #expect(unavailable(root.paths)?.reason == .xenfsNotLoaded)

        root.makeDirectory("/proc/xen")
        #expect(unavailable(root.paths)?.reason == .xenfsNotMounted)

        root.write("/proc/xen/capabilities", "")
        let domU = try #require(unavailable(root.paths))
        #expect(domU.reason == .notControlDomain(""))
        #expect(domU.summary == "this is a Xen guest (domU), not the control domain (dom0)")

        root.write("/proc/xen/capabilities", "control_d\n")
        let noPrivcmd = try #require(unavailable(root.paths))
        #expect(noPrivcmd.reason == .noPrivcmd)
        #expect(noPrivcmd.observations.map(\.subject) == [
            "\(root.path)/sys/hypervisor/type", "\(root.path)/proc/xen/capabilities",
            "\(root.path)/dev/xen/privcmd or \(root.path)/proc/xen/privcmd",
        ])
        #expect(noPrivcmd.description.contains("(want \"control_d\"): \"control_d\""))
    }

    @Test("When the files claim Xen but the interfaces do not open, the library's reason is kept and nothing leaks",
          .enabled(if: !ThisHost.isXenDom0, "on a dom0 the real interfaces open"))
    func interfacesThatDoNotOpen() throws {
        let root = FakeRoot()
        defer { root.remove() }
        root.write("/sys/hypervisor/type", "xen")
        root.write("/proc/xen/capabilities", "control_d")
        root.write("/dev/xen/privcmd", "")
        let census = XenHandleCensus.count
        let error = try #require(unavailable(root.paths))
        guard case .interfaceFailed(let cause) = error.reason else {
            Issue.record("expected an interface failure, got \(error)")
            return
        }
        print("XenHost.detect with a fake Xen tree: \(error)")
        #expect(cause.call == "xc_interface_open")
        #expect(cause.isMissingDevice || cause.isPermissionDenied, "\(cause)")
        #expect(!cause.log.isEmpty, "libxencall logs which device it could not open: \(cause)")
        #expect(error.observations.last?.subject == "libxenctrl (xc_interface_open)")
        #expect(XenHandleCensus.count == census)
        #expect(xenDeviceDescriptors().isEmpty)
    }

    @Test("Each handle alone fails with its call's name and errno and holds nothing",
          .enabled(if: !ThisHost.isXenDom0, "on a dom0 the handles open"))
    func handlesFailCleanly() {
        let census = XenHandleCensus.count
        do {
            let log = XenLog()
            #expect(throws: XenError.self) { _ = try XenControl(log: log) }
            #expect(throws: XenError.self) { _ = try XenStoreConnection(log: log) }
            #expect(throws: XenError.self) { _ = try XenEventChannels(log: log) }
            #expect(throws: XenError.self) { _ = try XenForeignMemory(log: log) }
            #expect(throws: XenError.self) { _ = try XenLight(log: log) }
            do {
                _ = try XenControl(log: log)
            } catch {
                #expect(error.call == "xc_interface_open")
                #expect(error.errno != nil && error.errno != 0)
            }
            do {
                _ = try XenLight(log: log)
            } catch {
                #expect(error.call == "libxl_ctx_alloc")
                #expect(error.errno == nil, "libxl reports its own codes: \(error)")
            }
            #expect(XenHandleCensus.count == census + 1, "only the log is alive")
        }
        #expect(XenHandleCensus.count == census)
        #expect(xenDeviceDescriptors().isEmpty)
    }

    @Test("Another release is refused naming the build's release, the one found, both supported ones and which build to use")
    func versionMismatchMessage() {
        let text = XenUnavailable.versionMismatch(found: XenVersion(major: 4, minor: 20, extra: ".4"), builtFor: (4, 17))
        #expect(text.contains("the hypervisor is Xen 4.20.4"))
        #expect(text.contains("built for Xen 4.17"))
        #expect(text.contains("Xen 4.17 on Debian 12 (bookworm)"))
        #expect(text.contains("Xen 4.20 on Debian 13 (trixie)"))
        #expect(text.contains("use remusd built against Xen 4.20's libxen-dev"), "\(text)")

        let unknown = XenUnavailable.versionMismatch(found: XenVersion(major: 4, minor: 19, extra: ".1"), builtFor: (4, 20))
        #expect(unknown.contains("Xen 4.19 is not supported"))
        #expect(unknown.contains("built for Xen 4.20"))
        let summary = XenUnavailable(reason: .unsupportedVersion(XenVersion(major: 4, minor: 16)), observations: []).summary
        #expect(summary.contains("built for Xen \(XenHost.supportedVersion.major).\(XenHost.supportedVersion.minor)"))
    }

    @Test("In dom0, detection opens every interface, reads the release it was built for, and dropping the host closes them all",
          .enabled(if: ThisHost.isXenDom0, "not a Xen dom0"))
    func dom0OpensAndCloses() throws {
        let census = XenHandleCensus.count
        let descriptors = xenDeviceDescriptors()
        do {
            let host = try XenHost.detect()
            #expect(host.version.major == XenHost.supportedVersion.major && host.version.minor == XenHost.supportedVersion.minor, "\(host.version)")
            #expect(host.store.read("/local/domain/0/name") == "Domain-0")
            let pages = try XenHypercallPages(control: host.control, pages: 4)
            pages.bytes.initializeMemory(as: UInt8.self, repeating: 0xA5)
            #expect(pages.bytes.count == 4 * 4096)
            #expect(XenHandleCensus.count == census + 7, "the log, five handles and the pages")
            #expect(xenDeviceDescriptors().count > descriptors.count, "the handles hold Xen's device nodes")
            print("XenHost.detect: Xen \(host.version); " + host.observations.map(\.description).joined(separator: "; "))
        }
        #expect(XenHandleCensus.count == census)
        #expect(xenDeviceDescriptors() == descriptors)
    }
}
}
