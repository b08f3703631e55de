//! Verifier logs turned into a reason an operator can act on.
//!
//! A refused program's log ends with statistics ("processed 2 insns ...",
//! "verification time 743 usec", "stack depth 0") that do not say why. The
//! reason is the verifier's error line(s), which follow the last instruction
//! it walked; [`summarize`] names those, the failing instruction and, when
//! the object carries line info, the source line (`; ...`) before it.
//!
//! The fixtures under `fixtures/verifier/` are logs from a real 6.18 kernel,
//! made by `gen.py` there (broken bytecode through `bpf(BPF_PROG_LOAD)`).

/// The longest reason [`summarize`] returns, in bytes.
pub const MAX_REASON_BYTES: usize = 400;

/// An instruction line: `12: (79) r0 = *(u64 *)(r1 +0)` (or a state line
/// `0: R1=ctx() R10=fp0`, which also starts with the instruction index).
fn is_insn(line: &str) -> bool {
    let digits = line.bytes().take_while(u8::is_ascii_digit).count();
    digits > 0 && line[digits..].starts_with(": ")
}

/// Statistics and path markers: never the reason.
fn is_noise(line: &str) -> bool {
    line.is_empty()
        || line.starts_with("processed ")
        || line.starts_with("verification time ")
        || line.starts_with("stack depth ")
        || line.starts_with("from ")
        || line.starts_with("-- BEGIN PROG LOAD LOG --")
        || line.starts_with("-- END PROG LOAD LOG --")
}

/// A one-line reason (at most [`MAX_REASON_BYTES`]) from a whole verifier
/// log: `<error> at insn <n: instruction> (source: <line>)`. A log without
/// an error line gives its last two meaningful lines, as before; an empty
/// log gives an empty string.
pub fn summarize(log: &str) -> String {
    let lines: Vec<&str> = log.lines().map(str::trim).collect();
    // The error block: the meaningful lines after the last instruction.
    let last_insn = lines.iter().rposition(|l| is_insn(l));
    let after = last_insn.map_or(0, |i| i + 1);
    let error: Vec<&str> = lines[after..]
        .iter()
        .copied()
        .filter(|l| !is_noise(l) && !l.starts_with("; "))
        .collect();
    let mut out = if error.is_empty() {
        let tail: Vec<&str> = lines.iter().copied().filter(|l| !is_noise(l)).collect();
        tail[tail.len().saturating_sub(2)..].join(" | ")
    } else {
        let mut s = error.join(": ");
        if let Some(i) = last_insn {
            // The register state the verifier appends after `;` is noise.
            let insn = lines[i].split("  ;").next().unwrap_or(lines[i]).trim_end();
            s.push_str(" at insn ");
            s.push_str(insn);
            if let Some(src) = lines[..i].iter().rev().find(|l| l.starts_with("; ")) {
                s.push_str(" (source: ");
                s.push_str(src[2..].trim());
                s.push(')');
            }
        }
        s
    };
    truncate(&mut out, MAX_REASON_BYTES);
    out
}

/// Cuts `s` to at most `max` bytes on a character boundary, marking the cut.
fn truncate(s: &mut String, max: usize) {
    if s.len() <= max {
        return;
    }
    let mut end = max - '…'.len_utf8();
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s.truncate(end);
    s.push('…');
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn real_logs() {
        let cases = [
            (
                include_str!("fixtures/verifier/scalar_deref.log"),
                "R1 invalid mem access 'scalar' at insn 1: (79) r0 = *(u64 *)(r1 +0)",
            ),
            (
                include_str!("fixtures/verifier/unknown_func.log"),
                "invalid func unknown#99999 at insn 0: (85) call unknown#99999",
            ),
            (
                include_str!("fixtures/verifier/r0_not_read_ok.log"),
                "R0 !read_ok at insn 0: (95) exit",
            ),
            (
                include_str!("fixtures/verifier/helper_not_allowed.log"),
                "program of this type cannot use helper bpf_override_return#58 \
                 at insn 1: (85) call bpf_override_return#58",
            ),
        ];
        for (log, want) in cases {
            assert_eq!(summarize(log), want, "log:\n{log}");
        }
        let s = summarize(include_str!("fixtures/verifier/helper_arg_type.log"));
        assert!(s.starts_with("R1 type=scalar expected=fp"), "{s}");
        assert!(
            s.ends_with("at insn 3: (85) call bpf_probe_read_kernel#113"),
            "{s}"
        );
    }

    /// The shape of a log with BTF line info (`; <source> @ <file>:<line>`
    /// before the instructions of that line); not a kernel capture.
    #[test]
    fn source_line_and_trailer() {
        let log = "0: R1=ctx() R10=fp0\n\
                   ; return *p; @ sched.rs:12\n\
                   0: (b7) r1 = 0                        ; R1=0\n\
                   1: (79) r0 = *(u64 *)(r1 +0)\n\
                   R1 invalid mem access 'scalar'\n\
                   processed 2 insns (limit 1000000)\n\
                   verification time 743 usec\nstack depth 0\n";
        assert_eq!(
            summarize(log),
            "R1 invalid mem access 'scalar' at insn 1: (79) r0 = *(u64 *)(r1 +0) \
             (source: return *p; @ sched.rs:12)"
        );
    }

    #[test]
    fn no_error_line_and_cap() {
        assert_eq!(summarize(""), "");
        assert_eq!(
            summarize("0: (95) exit\nverification time 743 usec\nstack depth 0\n"),
            "0: (95) exit"
        );
        let long = format!("0: (95) exit\n{}\n", "é".repeat(500));
        let s = summarize(&long);
        assert!(
            s.len() <= MAX_REASON_BYTES && s.ends_with('…'),
            "{}",
            s.len()
        );
    }
}
