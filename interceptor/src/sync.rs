//! The one way the agent takes its locks.
//!
//! A lock is poisoned when a thread panicked while holding it. Every structure behind the
//! agent's locks is changed all-or-nothing (a new value is built, then swapped in), so the
//! value a panicking thread left behind is still a consistent one: the agent keeps using it
//! rather than failing every later request.

use std::sync::{Mutex, MutexGuard, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard};

/// Locks `mutex`, also after a panic elsewhere.
pub fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Read-locks `lock`, also after a panic elsewhere.
pub fn read<T>(lock: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    lock.read().unwrap_or_else(PoisonError::into_inner)
}

/// Write-locks `lock`, also after a panic elsewhere.
pub fn write<T>(lock: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    lock.write().unwrap_or_else(PoisonError::into_inner)
}
