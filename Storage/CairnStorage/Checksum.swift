import CairnCore

/// CRC-32C, which lives in `CairnCore` (the wire protocol uses it too); named here so that
/// importers of `CairnStorage` keep finding it.
public typealias CRC32C = CairnCore.CRC32C
