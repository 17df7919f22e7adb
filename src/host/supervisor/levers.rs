//! The control-socket requests that move a VM's levers, from the policy's action: in bytes,
//! never below the VM's reservation.

use super::VmAction;
use crate::api::protocol::{AllocArgs, BalloonArgs, ReclaimArgs, SharingArgs, VmRequest};
use crate::units::PAGE_SIZE;

/// A lever of `bytes`, never below the reservation (nor below a page: 0 would mean off).
fn lever_bytes(bytes: u64, reservation: u64) -> u64 {
    bytes.max(reservation).max(PAGE_SIZE)
}

/// The control-socket request of each lever of `action` (the balloon's only with a balloon)
/// for a VM with `reservation` bytes reserved. The balloon moves in 4 KiB pages: its target
/// is rounded down to one (a page less given back, never a page more taken).
pub(super) fn lever_requests(
    action: &VmAction,
    balloon: bool,
    reservation: u64,
) -> Vec<(&'static str, VmRequest)> {
    let mut out = Vec::with_capacity(4);
    if balloon {
        let target_bytes = action.balloon_bytes - action.balloon_bytes % PAGE_SIZE;
        out.push(("balloon", VmRequest::Balloon(BalloonArgs { target_bytes })));
    }
    let target_bytes = action.reclaim_target_bytes.map(|b| lever_bytes(b, reservation));
    out.push(("reclaim", VmRequest::Reclaim(ReclaimArgs { target_bytes })));
    let scan_rate = action.share_scan_rate;
    out.push(("sharing", VmRequest::Sharing(SharingArgs { scan_rate })));
    let wait_above_bytes = action.alloc_wait_above_bytes.map(|b| lever_bytes(b, reservation));
    out.push(("alloc", VmRequest::Alloc(AllocArgs { wait_above_bytes })));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::units::MIB;

    #[test]
    fn levers_travel_in_bytes_never_below_the_reservation() {
        assert_eq!(lever_bytes(30 * MIB + MIB / 2, 0), 30 * MIB + MIB / 2, "not rounded");
        assert_eq!(lever_bytes(160 * MIB, 159 * MIB + 1), 160 * MIB);
        assert_eq!(lever_bytes(100 * MIB, 159 * MIB + 1), 159 * MIB + 1, "the reservation");
        assert_eq!(lever_bytes(0, 0), PAGE_SIZE, "0 means off: the least lever is a page");
        let action = VmAction { balloon_bytes: 8 * MIB + 100, ..VmAction::default() };
        let reqs = lever_requests(&action, true, 0);
        assert_eq!(reqs[0].1, VmRequest::Balloon(BalloonArgs { target_bytes: 8 * MIB }));
    }
}
