// RemusSim: the simulated guest backend (see Docs/architecture.md).
