//! Restarts that keep VMs: the supervisor's side of the state directory. A host started on
//! a state directory adopts the VMs the list names that still run (and are the processes it
//! names), before it starts any VM of its description; a VM of the description that it
//! adopted is not started again. From then on it writes the list each time the set of VMs
//! running changes.
//!
//! An adopted VM is steered like any other. What it lost with its old host: its sharing
//! group's broker (it keeps what it shares but merges no more across the group), and the
//! levers' history (the policy sends every lever again at the first tick).

use super::{HostedVm, Supervisor};
use crate::host::child::VmProcess;
use crate::host::config::check_vm;
use crate::host::protocol::EventKind;
use crate::host::state::{start_time, SavedVm};

impl Supervisor {
    /// Adopts the VMs the state directory lists that still run.
    pub(super) fn adopt_saved(&mut self) {
        let Some(state) = self.state_dir.clone() else { return };
        let saved = state.load();
        for vm in saved {
            let name = vm.name.clone();
            let status = state.vm_dir().join(format!("{name}.status"));
            let sock = state.vm_dir().join(format!("{name}.sock"));
            let Some(proc) =
                VmProcess::adopt(&name, &sock, vm.pid, vm.start_time, status.clone(), vm.uid)
            else {
                let how = std::fs::read_to_string(&status)
                    .ok()
                    .and_then(|t| t.trim().parse::<i32>().ok())
                    .map_or_else(|| "how is not known".to_owned(), |c| format!("exit status {c}"));
                log::warn!("vm {name}: ended while no host watched it ({how})");
                self.lock().events.push(EventKind::Ended { vm: name, how });
                continue;
            };
            let spec = match check_vm(vm.entry.clone()) {
                Ok(s) => s,
                Err(e) => {
                    log::error!("vm {name}: its saved description no longer passes ({e}): left running, not adopted");
                    continue;
                }
            };
            if let Some(uid) = vm.uid {
                crate::jail::vm_uid_taken(uid);
            }
            log::info!("vm {name}: adopted, pid {}", proc.pid());
            self.pending.retain(|p| p.entry.name != name);
            {
                let mut shared = self.lock();
                shared.vms.push(HostedVm {
                    name: name.clone(),
                    sock: proc.sock.clone(),
                    pid: proc.pid(),
                    entry: spec.entry.clone(),
                });
                shared.events.push(EventKind::Adopted { vm: name, pid: proc.pid() });
            }
            let mut slot = super::Slot::new(spec, proc);
            slot.start_time = Some(vm.start_time);
            slot.starting = None; // it was up before: a late socket makes it stale, not failed
            self.slots.push(slot);
        }
        let reserved = (self.slots.iter().map(|s| &s.spec))
            .chain(self.pending.iter())
            .map(|s| s.reservation_bytes)
            .sum();
        self.lock().reserved_bytes = reserved;
        self.save_state();
    }

    /// Writes the list of VMs running, if the host keeps a state directory.
    pub(super) fn save_state(&mut self) {
        let Some(state) = self.state_dir.clone() else { return };
        let mut vms = Vec::with_capacity(self.slots.len());
        for s in &mut self.slots {
            if s.proc.poll_exit().is_some() {
                continue;
            }
            let pid = s.proc.pid();
            let Some(start_time) = s.start_time.or_else(|| start_time(pid)) else { continue };
            s.start_time = Some(start_time);
            vms.push(SavedVm {
                name: s.spec.entry.name.clone(),
                pid,
                start_time,
                uid: s.proc.uid,
                entry: s.spec.entry.clone(),
            });
        }
        if let Err(e) = state.save(&vms) {
            log::warn!(
                "the state directory's VM list: {e} (a restarted host may not find every VM)"
            );
        }
    }
}
