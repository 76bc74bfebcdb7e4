//! Free space on the data folder's filesystem. Below the floor, the controller refuses new
//! mail (ingress answers `452 4.3.1`) while it goes on delivering what it holds, which frees
//! space; it takes mail again by itself once there is room.

use std::path::{Path, PathBuf};

use tonic::Status;

/// Checked on every enqueue request: one statvfs call, a microsecond.
pub struct DiskGuard {
    dir: PathBuf,
    min_free: u64,
}

/// Free bytes for an unprivileged writer on the filesystem holding `dir`.
pub fn free_bytes(dir: &Path) -> std::io::Result<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::other("path with a NUL byte"))?;
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a valid C string and `st` a valid statvfs to write into.
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(st.f_bavail as u64 * st.f_frsize as u64)
}

impl DiskGuard {
    pub fn new(dir: &Path, min_free: u64) -> Self {
        DiskGuard {
            dir: dir.to_path_buf(),
            min_free,
        }
    }

    fn free(&self) -> u64 {
        free_bytes(&self.dir).unwrap_or(u64::MAX)
    }

    /// Ok when `incoming` more bytes leave at least the floor free.
    pub fn admit(&self, incoming: u64) -> Result<(), Status> {
        let free = self.free();
        if free < self.min_free.saturating_add(incoming) {
            tracing::warn!(
                free,
                min = self.min_free,
                "refusing new mail: the data folder's disk is nearly full"
            );
            return Err(Status::resource_exhausted(format!(
                "insufficient storage on the controller: {} MB free, {} MB kept free",
                free >> 20,
                self.min_free >> 20
            )));
        }
        Ok(())
    }
}
