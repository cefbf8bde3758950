// The system layer (errno type, syscalls, sockets, child processes, threads and locks) lives in
// RemusSystem, shared with the backends and the outputs.
@_exported import RemusSystem
