//! What the unwinder needs from one ELF object: its load segments (to turn a mapping into a
//! load bias) and its unwind sections, read once and shared by every process that maps it.

use std::fs::File;
use std::ops::Range;
use std::sync::Arc;

use anyhow::Context as _;
use framehop::ExplicitModuleSectionInfo;
use object::elf::{PF_X, PT_GNU_EH_FRAME, PT_LOAD};
use object::read::elf::{ElfFile64, ProgramHeader as _};
use object::{Endianness, Object as _, ObjectSection as _, ReadCache, ReadRef};

/// Mappings start at a page boundary of the file; `x86_64` pages are 4 KiB.
const PAGE_MASK: u64 = 0xfff;

/// `DW_EH_PE_pcrel | DW_EH_PE_sdata4`, the encoding every linker uses for `eh_frame_ptr`.
const EH_PE_PCREL_SDATA4: u8 = 0x1b;

/// Unwind data of one ELF file. Section bytes are copies (not a mapping of the file), so a
/// binary rewritten in place cannot SIGBUS us; they are behind `Arc` so that framehop modules
/// of every process share them.
#[derive(Debug)]
pub(crate) struct CodeObject {
    loads: Vec<LoadSegment>,
    text_svma: Option<Range<u64>>,
    got_svma: Option<Range<u64>>,
    eh_frame: Option<Section>,
    eh_frame_hdr: Option<Section>,
    debug_frame: Option<Arc<[u8]>>,
}

#[derive(Debug)]
struct LoadSegment {
    offset: u64,
    vaddr: u64,
    filesz: u64,
    exec: bool,
}

#[derive(Debug)]
struct Section {
    svma: Range<u64>,
    data: Arc<[u8]>,
}

impl Section {
    fn new(svma: Range<u64>, data: Arc<[u8]>) -> Self {
        Self { svma, data }
    }
}

impl CodeObject {
    /// Reads the headers and unwind sections of an ELF file (only those parts, not all of it).
    pub fn read_file(file: &File) -> anyhow::Result<Self> {
        let cache = ReadCache::new(file);
        Self::parse(&cache)
    }

    /// Parses an ELF image held in memory (the vDSO).
    pub fn parse_bytes(data: &[u8]) -> anyhow::Result<Self> {
        Self::parse(data)
    }

    fn parse<'data, R: ReadRef<'data>>(data: R) -> anyhow::Result<Self> {
        let elf = ElfFile64::<Endianness, R>::parse(data).context("not a 64-bit ELF file")?;
        let endian = elf.endian();

        let loads: Vec<LoadSegment> = elf
            .elf_program_headers()
            .iter()
            .filter(|ph| ph.p_type(endian) == PT_LOAD)
            .map(|ph| LoadSegment {
                offset: ph.p_offset(endian),
                vaddr: ph.p_vaddr(endian),
                filesz: ph.p_filesz(endian),
                exec: ph.p_flags(endian) & PF_X != 0,
            })
            .collect();

        let mut object = CodeObject {
            loads,
            text_svma: None,
            got_svma: None,
            eh_frame: None,
            eh_frame_hdr: None,
            debug_frame: None,
        };
        for section in elf.sections() {
            let Ok(name) = section.name() else { continue };
            let svma = section.address()..section.address() + section.size();
            let bytes = || -> anyhow::Result<Arc<[u8]>> {
                let bytes = section.data().with_context(|| format!("reading {name}"))?;
                Ok(Arc::from(bytes))
            };
            match name {
                ".text" => object.text_svma = Some(svma),
                ".got" => object.got_svma = Some(svma),
                ".eh_frame" => object.eh_frame = Some(Section::new(svma, bytes()?)),
                ".eh_frame_hdr" => object.eh_frame_hdr = Some(Section::new(svma, bytes()?)),
                ".debug_frame" => object.debug_frame = Some(bytes()?),
                _ => {}
            }
        }

        // Without section headers (sstrip'ed files), the loader's own index still points at
        // the tables: PT_GNU_EH_FRAME is .eh_frame_hdr, and its eh_frame_ptr locates .eh_frame.
        if object.eh_frame_hdr.is_none()
            && let Some(ph) = elf
                .elf_program_headers()
                .iter()
                .find(|ph| ph.p_type(endian) == PT_GNU_EH_FRAME)
        {
            let vaddr = ph.p_vaddr(endian);
            let bytes = data
                .read_bytes_at(ph.p_offset(endian), ph.p_filesz(endian))
                .ok()
                .context("reading PT_GNU_EH_FRAME")?;
            object.eh_frame_hdr = Some(Section {
                svma: vaddr..vaddr + bytes.len() as u64,
                data: Arc::from(bytes),
            });
        }
        if object.eh_frame.is_none()
            && let Some(hdr) = &object.eh_frame_hdr
            && let Some(start) = eh_frame_ptr(hdr)
            && let Some(segment) = object
                .loads
                .iter()
                .find(|s| (s.vaddr..s.vaddr + s.filesz).contains(&start))
        {
            // The length is not recorded anywhere but in the section header: take the rest of
            // the segment. Trailing bytes are harmless, the hdr's table indexes the FDEs.
            let offset = segment.offset + (start - segment.vaddr);
            let len = segment.vaddr + segment.filesz - start;
            if let Ok(bytes) = data.read_bytes_at(offset, len) {
                object.eh_frame = Some(Section {
                    svma: start..start + len,
                    data: Arc::from(bytes),
                });
            }
        }
        Ok(object)
    }

    /// Whether framehop can do better than frame pointers in this object.
    pub fn has_unwind_info(&self) -> bool {
        self.eh_frame.is_some() || self.debug_frame.is_some()
    }

    /// Difference between addresses in the process and addresses stated in the file, for the
    /// mapping of file offset `offset` at address `start`.
    pub fn load_bias(&self, start: u64, offset: u64) -> u64 {
        let covers =
            |s: &&LoadSegment| (s.offset & !PAGE_MASK) <= offset && offset < s.offset + s.filesz;
        // Page rounding can make a mapping cover the tail of the previous segment too; the
        // executable one is the one whose addresses we look up.
        let segment = self
            .loads
            .iter()
            .filter(|s| s.exec)
            .find(covers)
            .or_else(|| self.loads.iter().find(covers));
        let delta = segment.map_or(0, |s| s.vaddr.wrapping_sub(s.offset));
        start.wrapping_sub(offset).wrapping_sub(delta)
    }

    /// Section data in the form framehop's `Module::new` takes (cheap: clones `Arc`s).
    pub fn section_info(&self) -> ExplicitModuleSectionInfo<Arc<[u8]>> {
        ExplicitModuleSectionInfo {
            // ELF addresses are stated relative to 0.
            base_svma: 0,
            text_svma: self.text_svma.clone(),
            got_svma: self.got_svma.clone(),
            eh_frame_svma: self.eh_frame.as_ref().map(|s| s.svma.clone()),
            eh_frame: self.eh_frame.as_ref().map(|s| Arc::clone(&s.data)),
            eh_frame_hdr_svma: self.eh_frame_hdr.as_ref().map(|s| s.svma.clone()),
            eh_frame_hdr: self.eh_frame_hdr.as_ref().map(|s| Arc::clone(&s.data)),
            debug_frame: self.debug_frame.clone(),
            ..ExplicitModuleSectionInfo::default()
        }
    }
}

/// Decodes `eh_frame_ptr` from an `.eh_frame_hdr`
/// (<https://refspecs.linuxfoundation.org/LSB_5.0.0/LSB-Core-generic/LSB-Core-generic/ehframechpt.html>).
fn eh_frame_ptr(hdr: &Section) -> Option<u64> {
    let bytes = hdr.data.get(..8)?;
    if bytes[0] != 1 || bytes[1] != EH_PE_PCREL_SDATA4 {
        return None;
    }
    let rel = i32::from_le_bytes(bytes[4..8].try_into().ok()?);
    (hdr.svma.start + 4).checked_add_signed(i64::from(rel))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn own_exe() -> CodeObject {
        let file = File::open("/proc/self/exe").unwrap();
        CodeObject::read_file(&file).unwrap()
    }

    #[test]
    fn reads_own_unwind_sections() {
        let object = own_exe();
        assert!(object.has_unwind_info());
        let hdr = object.eh_frame_hdr.as_ref().unwrap();
        let eh_frame = object.eh_frame.as_ref().unwrap();
        assert_eq!(hdr.data.len() as u64, hdr.svma.end - hdr.svma.start);
        // The fallback decoder agrees with the section header.
        assert_eq!(eh_frame_ptr(hdr), Some(eh_frame.svma.start));
    }

    #[test]
    fn load_bias_matches_the_running_process() {
        let object = own_exe();
        let maps =
            super::super::maps::parse_maps(&std::fs::read_to_string("/proc/self/maps").unwrap());
        let here = load_bias_matches_the_running_process as *const () as u64;
        let code = maps
            .iter()
            .find(|m| (m.start..m.end).contains(&here))
            .unwrap();
        let bias = object.load_bias(code.start, code.offset);
        // The .text range stated in the file, moved by the bias, holds this function.
        let text = object.text_svma.clone().unwrap();
        assert!((text.start + bias..text.end + bias).contains(&here));
    }
}
