//! Reading kernel structs at offsets userspace found in the running
//! kernel's BTF (Rust has no CO-RE field relocations).

use aya_ebpf::helpers::bpf_probe_read_kernel;

/// Reads a `T` at `base + offset` with `bpf_probe_read_kernel`, which
/// fails safely on a bad address.
#[inline(always)]
pub fn read<T>(base: u64, offset: u32) -> Option<T> {
    // SAFETY: bpf_probe_read_kernel faults safely on a bad address.
    unsafe { bpf_probe_read_kernel((base + offset as u64) as *const T).ok() }
}

/// Reads a scalar field of a kernel struct. With `BTF` (the `tp_btf`
/// programs) `base` is a BTF-typed pointer argument and this is a plain
/// load: the verifier checks it against the kernel's BTF and turns it into
/// a fault-safe load (`BPF_PROBE_MEM`; a bad address reads 0). No helper
/// call: `bpf_probe_read_kernel` costs about 38 ns per call on a KVM guest,
/// as much as a whole program's other work. The `raw_tp` programs get
/// untyped pointers and keep the helper.
///
/// Only fields that lie inside the argument's BTF type may be read so (the
/// verifier rejects loads past it, e.g. `tcp_sock` fields through a
/// `struct sock *`), and only at their own size.
#[inline(always)]
pub fn field<T: Copy, const BTF: bool>(base: u64, offset: u32) -> Option<T> {
    if BTF {
        // SAFETY: the verifier rewrites this load into one that cannot
        // fault (PTR_TO_BTF_ID access, checked against the type's layout).
        Some(unsafe { core::ptr::read_volatile((base + offset as u64) as *const T) })
    } else {
        read(base, offset)
    }
}
