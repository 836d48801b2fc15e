//! A parser for `/proc/PID/maps`: just the columns unwinding and symbolization need.
//!
//! Format: `start-end perms offset major:minor inode [pathname]`, see `proc_pid_maps(5)` and
//! `show_map_vma` in <https://github.com/torvalds/linux/blob/master/fs/proc/task_mmu.c>.

use std::sync::Arc;

/// The suffix the kernel appends to the path of a mapped file that has since been unlinked.
const DELETED_SUFFIX: &str = " (deleted)";

/// One line of `/proc/PID/maps`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct MapEntry {
    pub start: u64,
    pub end: u64,
    /// The `x` permission bit: only executable mappings can hold an instruction pointer.
    pub exec: bool,
    /// Offset in the mapped file of the byte at `start`.
    pub offset: u64,
    /// Device of the mapped file, as `libc::makedev(major, minor)`.
    pub dev: u64,
    /// Inode of the mapped file; 0 for anonymous and pseudo mappings (`[vdso]`, `[heap]`).
    pub inode: u64,
    /// The pathname column without the ` (deleted)` suffix; `None` when it is empty.
    pub path: Option<Arc<str>>,
    /// The file was unlinked after it was mapped: the path may now name another file.
    pub deleted: bool,
}

impl MapEntry {
    /// A mapping of a file (as opposed to anonymous memory or a kernel pseudo mapping).
    pub fn is_file(&self) -> bool {
        self.inode != 0 && self.path.as_deref().is_some_and(|p| p.starts_with('/'))
    }
}

/// Parses the text of `/proc/PID/maps`. Lines that do not parse are skipped: the kernel writes
/// this file, so a bad line means a format we do not know, and the rest is still useful.
pub(crate) fn parse_maps(text: &str) -> Vec<MapEntry> {
    text.lines().filter_map(parse_line).collect()
}

fn parse_line(line: &str) -> Option<MapEntry> {
    let (range, rest) = next_field(line)?;
    let (perms, rest) = next_field(rest)?;
    let (offset, rest) = next_field(rest)?;
    let (dev, rest) = next_field(rest)?;
    let (inode, rest) = next_field(rest)?;

    let (start, end) = range.split_once('-')?;
    let start = u64::from_str_radix(start, 16).ok()?;
    let end = u64::from_str_radix(end, 16).ok()?;
    let (major, minor) = dev.split_once(':')?;
    let dev = libc::makedev(
        u32::from_str_radix(major, 16).ok()?,
        u32::from_str_radix(minor, 16).ok()?,
    );

    // The pathname is the rest of the line and may itself contain spaces.
    let path = rest.trim_start();
    let (path, deleted) = match path.strip_suffix(DELETED_SUFFIX) {
        Some(path) => (path, true),
        None => (path, false),
    };
    Some(MapEntry {
        start,
        end,
        exec: perms.as_bytes().get(2) == Some(&b'x'),
        offset: u64::from_str_radix(offset, 16).ok()?,
        dev,
        inode: inode.parse().ok()?,
        path: (!path.is_empty()).then(|| Arc::from(path)),
        deleted,
    })
}

/// Splits off the next space-separated field.
fn next_field(s: &str) -> Option<(&str, &str)> {
    let s = s.trim_start_matches(' ');
    let end = s.find(' ').unwrap_or(s.len());
    (end > 0).then(|| s.split_at(end))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "\
55d0c8a00000-55d0c8a02000 r--p 00000000 08:01 1835057                    /usr/bin/cat
55d0c8a02000-55d0c8a07000 r-xp 00002000 08:01 1835057                    /usr/bin/cat
55d0c9d6b000-55d0c9d8c000 rw-p 00000000 00:00 0                          [heap]
7f3a1c000000-7f3a1c021000 rw-p 00000000 00:00 0 
7f3a1d828000-7f3a1d9bd000 r-xp 00028000 fd:02 2359420                    /usr/lib/x86_64-linux-gnu/libc.so.6
7f3a1da00000-7f3a1da01000 r-xp 00001000 00:1f 77                         /tmp/my lib.so (deleted)
7ffd5c3f1000-7ffd5c3f3000 r-xp 00000000 00:00 0                          [vdso]
ffffffffff600000-ffffffffff601000 --xp 00000000 00:00 0                  [vsyscall]
garbage line
";

    #[test]
    fn parses_sample() {
        let maps = parse_maps(SAMPLE);
        assert_eq!(maps.len(), 8, "{maps:#?}");

        assert_eq!(
            maps[1],
            MapEntry {
                start: 0x55d0_c8a0_2000,
                end: 0x55d0_c8a0_7000,
                exec: true,
                offset: 0x2000,
                dev: libc::makedev(8, 1),
                inode: 1_835_057,
                path: Some(Arc::from("/usr/bin/cat")),
                deleted: false,
            }
        );
        assert!(maps[1].is_file());
        assert!(!maps[0].exec);

        assert_eq!(maps[2].path.as_deref(), Some("[heap]"));
        assert!(!maps[2].is_file());

        // Anonymous: trailing space, no path.
        assert_eq!(maps[3].path, None);
        assert_eq!(maps[3].inode, 0);

        assert_eq!(maps[4].dev, libc::makedev(0xfd, 2));
        assert_eq!(maps[4].offset, 0x28000);

        // Spaces inside the path survive; the deletion marker does not.
        assert_eq!(maps[5].path.as_deref(), Some("/tmp/my lib.so"));
        assert!(maps[5].deleted);

        assert_eq!(maps[6].path.as_deref(), Some("[vdso]"));
        assert!(maps[6].exec && !maps[6].is_file());

        assert_eq!(maps[7].start, 0xffff_ffff_ff60_0000);
    }

    #[test]
    fn parses_own_maps() {
        let text = std::fs::read_to_string("/proc/self/maps").unwrap();
        let maps = parse_maps(&text);
        assert_eq!(maps.len(), text.lines().count());
        let here = parses_own_maps as *const () as u64;
        let code = maps
            .iter()
            .find(|m| (m.start..m.end).contains(&here))
            .unwrap();
        assert!(code.exec && code.is_file(), "{code:?}");
    }
}
