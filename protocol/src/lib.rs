//! Reprise's wire and persisted types. Nothing here does IO.
