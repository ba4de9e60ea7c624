//! The vmreplay command line
