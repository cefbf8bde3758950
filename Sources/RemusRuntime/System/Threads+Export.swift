// The runtime's threads and locks live in RemusThreads, shared with the Xen backend.
@_exported import RemusThreads
