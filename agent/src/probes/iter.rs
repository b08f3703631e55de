//! BPF iterators (`BPF_TRACE_ITER`, 5.8): programs the agent runs on demand
//! by reading a file, instead of attaching them to an event.
//!
//! aya 0.14 keeps an iterator link's fd private and turns the link into a
//! single file, so [`IterLink`] makes the `BPF_LINK_CREATE` call itself and
//! keeps the link, to run the iterator again at every collection.

use std::fs::File;
use std::io::Read;
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

/// `BPF_LINK_CREATE` and `BPF_ITER_CREATE` (include/uapi/linux/bpf.h).
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_ITER_CREATE: libc::c_long = 33;
/// `enum bpf_attach_type`: `BPF_TRACE_ITER`.
const BPF_TRACE_ITER: u32 = 28;
/// Large enough for every `union bpf_attr` member used here; the kernel
/// checks that bytes it does not know are zero.
const ATTR_SIZE: usize = 128;

/// Errors linking or running an iterator; each names the call.
#[derive(Debug, thiserror::Error)]
pub enum IterError {
    /// A `bpf(2)` command failed.
    #[error("bpf({call}): {source}")]
    Syscall {
        /// `BPF_LINK_CREATE` or `BPF_ITER_CREATE`.
        call: &'static str,
        /// The errno.
        #[source]
        source: std::io::Error,
    },
    /// Reading the iterator's output failed (the program's run is the read).
    #[error("reading the iterator's output: {0}")]
    Read(#[source] std::io::Error),
}

/// `bpf(cmd, attr)`, returning the new fd.
fn bpf_fd(
    cmd: libc::c_long,
    attr: &mut [u8; ATTR_SIZE],
    call: &'static str,
) -> Result<OwnedFd, IterError> {
    // SAFETY: `attr` is a zeroed buffer at least as large as the kernel's
    // `union bpf_attr` members these commands read; the fd returned is new
    // and owned by us.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr.as_mut_ptr(),
            ATTR_SIZE as libc::c_uint,
        )
    };
    if r < 0 {
        return Err(IterError::Syscall {
            call,
            source: std::io::Error::last_os_error(),
        });
    }
    // SAFETY: a successful call returns a new file descriptor.
    Ok(unsafe { OwnedFd::from_raw_fd(r as i32) })
}

/// A linked iterator program: each [`IterLink::run`] walks its target once.
/// Dropping it releases the link.
#[derive(Debug)]
pub struct IterLink {
    link: OwnedFd,
}

impl IterLink {
    /// Links the loaded iterator program `prog`.
    pub fn link(prog: BorrowedFd<'_>) -> Result<Self, IterError> {
        let mut attr = [0u8; ATTR_SIZE];
        // link_create: prog_fd @0, target_fd @4, attach_type @8, flags @12.
        attr[0..4].copy_from_slice(&(prog.as_raw_fd() as u32).to_ne_bytes());
        attr[8..12].copy_from_slice(&BPF_TRACE_ITER.to_ne_bytes());
        let link = bpf_fd(BPF_LINK_CREATE, &mut attr, "BPF_LINK_CREATE")?;
        Ok(IterLink { link })
    }

    /// Runs the program over its target and appends what it wrote
    /// (`bpf_seq_write`) to `out`: reading the iterator's file to the end
    /// is what runs it.
    pub fn run(&self, out: &mut Vec<u8>) -> Result<(), IterError> {
        let mut attr = [0u8; ATTR_SIZE];
        // iter_create: link_fd @0, flags @4.
        attr[0..4].copy_from_slice(&(self.link.as_raw_fd() as u32).to_ne_bytes());
        let fd = bpf_fd(BPF_ITER_CREATE, &mut attr, "BPF_ITER_CREATE")?;
        File::from(fd).read_to_end(out).map_err(IterError::Read)?;
        Ok(())
    }
}
