//! Guest memory as the VM sets it up: the memory manager, the stores for evicted pages (a
//! compression cache and a swap file), and the lazy-RAM engine with its reclaim worker,
//! which reads KVM's dirty log through the VM.

use std::sync::Arc;

use kvm_ioctls::VmFd;

use super::VmmError;
use crate::config::VmConfig;
use crate::mm::engine::{Engine, EngineConfig};
use crate::mm::fault::handler::HandlerConfig;
use crate::mm::reclaim::store::Backing;
use crate::mm::reclaim::DirtyLog;
use crate::mm::swap::SwapFile;
use crate::mm::MemoryManager;
use crate::units::{human_bytes, PAGE_SIZE};
use crate::vstate::memory::{GuestRam, RamRegion};
use crate::vstate::vm;

/// The memory manager for `ram`: with a page-state table and the stores of evicted pages
/// unless guest RAM is plain memory (`--no-uffd`).
///
/// # Errors
/// The swap file cannot be created in a directory the user named.
pub fn manager(config: &VmConfig, ram: &GuestRam) -> Result<MemoryManager, VmmError> {
    let mm = MemoryManager::new(&ram.regions(), config.memory.uffd);
    if config.memory.ksm {
        mm.merge_with_ksm().map_err(VmmError::Ksm)?;
    }
    if !config.memory.uffd {
        return Ok(mm);
    }
    let options = &config.memory.reclaim;
    let mem = ram.mem_bytes();
    let swap = swap_file(config)?;
    let backing = Backing::new(mem / PAGE_SIZE, options.cache.bytes(mem), swap);
    Ok(mm.with_backing(Arc::new(backing)))
}

/// The VM's swap file, unnamed from the start; None without one (`--swap-max 0`, or the
/// default directory refused it: then reclaim still compresses, and ebb says so).
fn swap_file(config: &VmConfig) -> Result<Option<SwapFile>, VmmError> {
    let options = &config.memory.reclaim;
    let max = options.swap_max_bytes.unwrap_or(config.mem_bytes);
    if max == 0 {
        return Ok(None);
    }
    let dir = options.swap_dir();
    match SwapFile::create(&dir, max) {
        Ok(f) => {
            log::debug!("swap file in {} (up to {})", dir.display(), human_bytes(max));
            Ok(Some(f))
        }
        Err(e) if options.swap_dir.is_none() => {
            log::warn!("no swap file: {e}; reclaim will only compress (see --swap-dir)");
            Ok(None)
        }
        Err(source) => Err(VmmError::Swap(source)),
    }
}

/// Starts the lazy-RAM engine unless `--no-uffd`.
pub fn start_engine(
    config: &VmConfig,
    mm: &MemoryManager,
    vm: &Arc<VmFd>,
    regions: Vec<RamRegion>,
) -> Result<Option<Arc<Engine>>, VmmError> {
    if !config.memory.uffd {
        log::info!("guest RAM is plain anonymous memory (--no-uffd)");
        return Ok(None);
    }
    let engine_config = EngineConfig {
        uffd_dev: config.memory.uffd_dev.clone(),
        handler: HandlerConfig {
            fault_around: config.memory.fault_around,
            active: Some(config.memory.active),
            oom_wait: config.memory.oom_wait,
        },
        reclaim_target: config.memory.reclaim.target_bytes,
        victims: config.memory.reclaim.victims,
        share_scan_rate: config.memory.share_scan_rate,
        share_hash: Default::default(),
        share_group_fds: config.memory.share_group_fds,
    };
    let engine = Engine::start(mm, &engine_config, Some(dirty_log(vm.clone(), regions)))?;
    log::debug!("userfaultfd engine: write protection {}", engine.write_protect());
    Ok(Some(Arc::new(engine)))
}

/// KVM's dirty log of guest RAM for the reclaim worker. Logging starts at the first call
/// (the worker calls only once a reclaim target is set), so a VM that never reclaims pays
/// nothing for it.
fn dirty_log(vm: Arc<VmFd>, regions: Vec<RamRegion>) -> DirtyLog {
    let mut on = false;
    Box::new(move |out: &mut Vec<u64>| {
        let err = |e: vm::VmError| std::io::Error::other(e.to_string());
        if !on {
            vm::log_dirty_pages(&vm, &regions).map_err(err)?;
            on = true;
            out.clear();
            return Ok(());
        }
        vm::dirty_bitmap(&vm, &regions, out).map_err(err)
    })
}
