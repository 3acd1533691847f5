//! The Rust client of fleet-ipc and the ipcctl CLI
