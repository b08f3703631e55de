//! `cargo xtask bench <cpu|net|export>`: see docs/performance.md.

use crate::Result;

pub fn bench(args: &[String]) -> Result<()> {
    Err(format!("bench {args:?}: not written yet"))
}
