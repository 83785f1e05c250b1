//! Collective allocation: the arena reserved at the job's first allocation and mapped at the same address in
//! every rank, and regions carved from it in allocation order, which every rank must follow (the barriers
//! of an allocation carry a tag of its size and kind, so that ranks that differ are told so).

use super::{Dsm, DEFAULT_ARENA_BASE};
use crate::error::{DsmError, Result};
use crate::region::{Arena, Consistency, GlobalVec, Placement, Region, RegionShared};
use crate::stats::Counters;
use crate::types::{Rank, PAGE_SIZE};
use crate::wire::{Reply, Request};
use std::sync::atomic::Ordering;
use std::sync::Arc;

/// The tag of the barrier after which rank 0 has reserved the shared arena (at a job's first allocation).
pub(crate) const ARENA_RESERVED: u64 = 0xA7E40;

/// The tag of the barrier after which every rank has mapped the arena, plus one on a rank that did.
pub(crate) const ARENA_MAPPED: u64 = 0xA7E4A;

/// The tag of the barriers that allocate region `id` of `len` bytes: ranks that allocate different regions
/// at the same point of a program meet at barriers of different tags, and are told so.
pub(crate) fn alloc_tag(
    id: u32,
    len: usize,
    placement: Placement,
    consistency: Consistency,
) -> u64 {
    let model = match consistency {
        Consistency::Sequential => 0,
        Consistency::Release => 1u64 << 47,
    };
    (u64::from(id) << 48) ^ (len as u64) ^ placement.code().rotate_left(40) ^ model
}

/// The bytes of a shared array of `len` elements of `T`, which must fit the address space and be aligned
/// by a region's start (regions start on a page).
fn vec_bytes<T>(len: usize) -> Result<usize> {
    if std::mem::align_of::<T>() > PAGE_SIZE {
        return Err(DsmError::Config(format!(
            "{} is aligned to {} bytes: shared arrays hold types aligned to at most a page ({PAGE_SIZE} bytes)",
            std::any::type_name::<T>(),
            std::mem::align_of::<T>()
        )));
    }
    len.checked_mul(std::mem::size_of::<T>())
        .ok_or_else(|| DsmError::Config(format!("{len} elements overflow the address space")))
}

impl Dsm {
    fn ensure_arena(&self) -> Result<()> {
        let s = &self.shared;
        if s.arena_base().is_some() {
            return Ok(());
        }
        if s.in_process && s.size > 1 {
            return Err(DsmError::RegionsNeedProcesses);
        }
        if s.me == Rank(0) {
            // If rank 0 cannot reserve, it returns the error and ends; the others see it fail.
            // The default base sits low in the address space (16 TiB), below where PIE executables, the heap,
            // shared libraries and thread stacks go, so that every rank finds it free.
            let a = match s.arena_base {
                Some(base) => Arena::reserve(s.me, Some(base), s.arena_size)?,
                None => Arena::reserve(s.me, Some(DEFAULT_ARENA_BASE), s.arena_size)
                    .or_else(|_| Arena::reserve(s.me, None, s.arena_size))?,
            };
            *s.arena.lock().unwrap_or_else(|p| p.into_inner()) = Some(a);
        }
        s.barrier_tagged(ARENA_RESERVED)?;
        let mut result = Ok(());
        if s.me != Rank(0) {
            let mut ch = s.channels.claim();
            let (reply, _, _) = ch
                .call(&s.counters, Rank(0), &Request::ArenaBase)
                .map_err(|e| s.peer_error(Rank(0), e))?;
            drop(ch);
            result = match reply {
                Reply::Arena { base, size } => {
                    Arena::reserve(s.me, Some(base as usize), size as usize).map(|a| {
                        *s.arena.lock().unwrap_or_else(|p| p.into_inner()) = Some(a);
                    })
                }
                _ => Err(DsmError::Config(
                    "rank 0 could not reserve the shared arena".into(),
                )),
            };
        }
        // A rank that could not map the arena says so through its barrier tag.
        match (
            s.barrier_tagged(ARENA_MAPPED + u64::from(result.is_ok())),
            result,
        ) {
            (_, Err(e)) => {
                s.caused_failure.store(true, Ordering::Release);
                Err(e)
            }
            (Err(DsmError::CollectiveMismatch { rank, .. }), Ok(())) => {
                Err(DsmError::Config(format!(
                "rank {} cannot map the shared arena at the address rank 0 chose; see its error",
                rank.0
            )))
            }
            (Ok(()), Ok(())) => self.introduce(),
            (r, Ok(())) => r,
        }
    }

    /// Tells every other rank this process's pid and userfaultfd, so that ranks on the same host can
    /// install pages here themselves (`direct.rs`). Each answers once it has taken the descriptor or
    /// decided not to; every rank has done this before it arrives at the barrier of its first allocation,
    /// so the first fault on a region finds every introduction handled.
    fn introduce(&self) -> Result<()> {
        let s = &self.shared;
        if s.size == 1 || !s.direct_install.load(Ordering::Relaxed) {
            return Ok(());
        }
        let Some(host) = crate::direct::Host::this() else {
            return Ok(());
        };
        let request = Request::Introduce {
            pid: std::process::id(),
            uffd: s.uffd()?.raw_fd(),
            boot: host.boot,
            pid_ns: host.pid_ns,
        };
        let mut ch = s.channels.claim();
        for r in (0..s.size as u32).map(Rank).filter(|r| *r != s.me) {
            let (reply, _, _) = ch
                .call(&s.counters, r, &request)
                .map_err(|e| s.peer_error(r, e))?;
            match reply {
                Reply::Introduced { accepted } => {
                    Counters::add(&s.counters.peers_installing_here, u64::from(accepted))
                }
                other => {
                    return Err(DsmError::Protocol {
                        rank: r,
                        what: format!("unexpected reply to an introduction: {other:?}"),
                    })
                }
            }
        }
        Ok(())
    }

    /// Allocates a shared region of at least `bytes` bytes, collectively: every rank calls `alloc` with the
    /// same arguments in the same order and gets the same address.
    pub fn alloc(&self, bytes: usize, placement: Placement) -> Result<Region<'_>> {
        self.alloc_with(bytes, placement, Consistency::Sequential)
    }

    /// Allocates a shared region with the given memory model, collectively (see [`Dsm::alloc`]).
    pub fn alloc_with(
        &self,
        bytes: usize,
        placement: Placement,
        consistency: Consistency,
    ) -> Result<Region<'_>> {
        let s = &self.shared;
        match placement {
            Placement::At(r) if r.index() >= s.size => {
                return Err(DsmError::Config(format!(
                    "placement at {r} in a job of {} ranks",
                    s.size
                )))
            }
            Placement::BlockCyclic(0) => {
                return Err(DsmError::Config(
                    "a block-cyclic placement's blocks hold at least one page: Placement::BlockCyclic(n) with n >= 1".into(),
                ))
            }
            _ => {}
        }
        self.ensure_arena()?;
        let uffd = s.uffd()?.raw_fd();
        let len = bytes
            .max(1)
            .checked_next_multiple_of(PAGE_SIZE)
            .ok_or_else(|| DsmError::Config(format!("{bytes} bytes overflow the address space")))?;
        let id = self.allocated.fetch_add(1, Ordering::Relaxed);
        let tag = alloc_tag(id, len, placement, consistency);
        s.barrier_tagged(tag)?;
        let addr = {
            let mut arena = s.arena.lock().unwrap_or_else(|p| p.into_inner());
            arena.as_mut().expect("the arena is reserved").carve(len)?
        };
        let inner = Arc::new(RegionShared::new(
            id,
            addr,
            len,
            placement,
            consistency,
            uffd,
            s.clone(),
        )?);
        {
            let mut regions = s.regions.write().unwrap_or_else(|p| p.into_inner());
            if regions.len() <= id as usize {
                regions.resize(id as usize + 1, None);
            }
            regions[id as usize] = Some(Arc::downgrade(&inner));
        }
        let region = Region::map(inner)?;
        // No rank may fault on the region before every rank can serve it.
        s.barrier_tagged(tag ^ 1)?;
        Ok(region)
    }

    /// Allocates a shared array of `len` elements with cyclic page placement, collectively.
    pub fn alloc_vec<T: bytemuck::Pod>(&self, len: usize) -> Result<GlobalVec<'_, T>> {
        self.alloc_vec_with(len, Placement::Cyclic)
    }

    /// Allocates a shared array of `len` elements with the given page placement and memory model,
    /// collectively.
    pub fn alloc_vec_in<T: bytemuck::Pod>(
        &self,
        len: usize,
        placement: Placement,
        consistency: Consistency,
    ) -> Result<GlobalVec<'_, T>> {
        let bytes = vec_bytes::<T>(len)?;
        Ok(GlobalVec::new(
            self.alloc_with(bytes, placement, consistency)?,
            len,
        ))
    }

    /// Allocates a shared array of `len` elements with the given page placement, collectively.
    pub fn alloc_vec_with<T: bytemuck::Pod>(
        &self,
        len: usize,
        placement: Placement,
    ) -> Result<GlobalVec<'_, T>> {
        let bytes = vec_bytes::<T>(len)?;
        Ok(GlobalVec::new(self.alloc(bytes, placement)?, len))
    }
}
