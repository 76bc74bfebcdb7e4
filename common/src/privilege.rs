//! Least privilege on the host: a node started as root binds its ports, hands its data folder
//! to `process-user`, and becomes that user and group for the rest of its life (so accounting
//! `|program` pipes run as that user too). Without `process-user`, running as root is refused
//! unless the policy says `run-as-root yes`. Files are created private: data folders 0700,
//! keys and certificates 0600, accounting files 0640.

use std::ffi::CString;
use std::path::Path;

/// Creates a folder (and its parents) that only its owner may enter.
pub fn private_dir(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    if path.exists() {
        let mode = std::fs::metadata(path)?.permissions().mode();
        if mode & 0o077 != 0 {
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o700))?;
        }
        return Ok(());
    }
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(path)
}

struct User {
    uid: libc::uid_t,
    gid: libc::gid_t,
}

fn lookup(name: &str) -> Result<User, String> {
    let c = CString::new(name).map_err(|_| format!("process-user `{name}` is not a user name"))?;
    let mut pw: libc::passwd = unsafe { std::mem::zeroed() };
    let mut buf = vec![0 as libc::c_char; 16 << 10];
    let mut out: *mut libc::passwd = std::ptr::null_mut();
    let rc =
        unsafe { libc::getpwnam_r(c.as_ptr(), &mut pw, buf.as_mut_ptr(), buf.len(), &mut out) };
    if rc != 0 || out.is_null() {
        return Err(format!("process-user `{name}`: no such user on this host"));
    }
    Ok(User {
        uid: pw.pw_uid,
        gid: pw.pw_gid,
    })
}

fn chown_tree(path: &Path, u: &User) -> Result<(), String> {
    if !path.exists() {
        return Ok(());
    }
    let meta = std::fs::symlink_metadata(path).map_err(|e| format!("{}: {e}", path.display()))?;
    if meta.file_type().is_symlink() {
        return Ok(());
    }
    std::os::unix::fs::lchown(path, Some(u.uid), Some(u.gid))
        .map_err(|e| format!("handing {} to process-user: {e}", path.display()))?;
    if meta.is_dir() {
        for entry in std::fs::read_dir(path).map_err(|e| format!("{}: {e}", path.display()))? {
            let entry = entry.map_err(|e| format!("{}: {e}", path.display()))?;
            chown_tree(&entry.path(), u)?;
        }
    }
    Ok(())
}

/// What a node does about its user once its ports are bound. `owned` are the folders it
/// writes (handed to `process-user` first); `readable` are files it must still read after
/// the switch (certificates it reloads, the policy it re-reads).
pub fn drop_privileges(
    process_user: Option<&str>,
    run_as_root: bool,
    owned: &[&Path],
    readable: &[&Path],
) -> Result<(), String> {
    let euid = unsafe { libc::geteuid() };
    if euid != 0 {
        if let Some(u) = process_user
            && lookup(u).map(|u| u.uid) != Ok(euid)
        {
            tracing::warn!(
                user = u,
                "not started as root: process-user is not applied, running as uid {euid}"
            );
        }
        return Ok(());
    }
    let Some(name) = process_user else {
        if run_as_root {
            tracing::warn!("running as root (run-as-root yes)");
            return Ok(());
        }
        return Err("refusing to run as root: set `process-user` in the policy to the user Sluice runs as (or `run-as-root yes` to run as root anyway)".into());
    };
    let u = lookup(name)?;
    if u.uid == 0 {
        return Ok(());
    }
    for dir in owned {
        private_dir(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        chown_tree(dir, &u)?;
    }
    // glibc applies these to every thread of the process.
    unsafe {
        if libc::setgroups(1, &u.gid) != 0 {
            return Err(format!("setgroups: {}", std::io::Error::last_os_error()));
        }
        if libc::setgid(u.gid) != 0 {
            return Err(format!(
                "setgid({}): {}",
                u.gid,
                std::io::Error::last_os_error()
            ));
        }
        if libc::setuid(u.uid) != 0 {
            return Err(format!(
                "setuid({}): {}",
                u.uid,
                std::io::Error::last_os_error()
            ));
        }
        if libc::setuid(0) == 0 {
            return Err("dropping root did not hold: setuid(0) still works".into());
        }
    }
    for f in readable {
        if let Err(e) = std::fs::File::open(f) {
            return Err(format!(
                "after becoming `{name}`, {} cannot be read ({e}): make it readable by that user",
                f.display()
            ));
        }
    }
    tracing::info!(user = name, uid = u.uid, gid = u.gid, "privileges dropped");
    Ok(())
}

/// Raises the soft limit on open files to the hard limit: an ingress holds one descriptor
/// per client, and the usual soft limit of 1024 is lower than `total-max-smtp-in`'s default.
/// Returns the limit now in force.
pub fn raise_open_files_limit() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit only read and write the struct given.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return 0;
        }
        if lim.rlim_cur < lim.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: lim.rlim_max,
                rlim_max: lim.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                return raised.rlim_cur;
            }
        }
    }
    lim.rlim_cur
}
