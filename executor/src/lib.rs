//! The reprise executor library.
