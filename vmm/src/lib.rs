//! vmreplay's built-in KVM microVM
