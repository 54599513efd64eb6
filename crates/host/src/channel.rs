//! A VM's message channel over the host API: requests queued for the guest, and the
//! guest's responses read by stream, for the center's gateway (which speaks OpenAI's API
//! to clients and follows the VM when it migrates).

use std::time::Duration;

use ferry_api::{ChannelMessage, StreamChunk, StreamEnd, StreamEvent, VmState};
use ferry_vmm::devices::channel::{self, Channel, Message, ReadError, Reading, SubmitError};

use crate::hosted::HostedVm;
use crate::{Host, HostError};

/// Longest a read waits for the next response.
pub const MAX_READ_WAIT: Duration = Duration::from_secs(10);

fn submit_error(id: &str, e: SubmitError) -> HostError {
    let text = format!("VM {id}: {e}");
    match e {
        SubmitError::NotReady | SubmitError::Paused => HostError::Unavailable(text),
        SubmitError::QueueFull | SubmitError::TooManyStreams => HostError::Busy(text),
        SubmitError::TooLarge { .. } => HostError::TooLarge(text),
        SubmitError::Detached => HostError::Moved(text),
        SubmitError::Ended => HostError::Conflict(text),
        SubmitError::StreamExists(_) => HostError::StreamExists(text),
        SubmitError::NoSuchStream(_) => HostError::StreamNotFound(text),
    }
}

/// The error for a VM whose channel is not this host's any more, if so.
fn moved(vm: &HostedVm) -> Option<HostError> {
    match vm.state() {
        VmState::MigratedAway { to } => Some(HostError::Moved(format!(
            "VM {} migrated to the host migrating at {to}",
            vm.id
        ))),
        _ => None,
    }
}

/// Queues `m` on `vm`'s channel with `queue` (a request or a control message).
fn send(
    vm: &HostedVm,
    m: ChannelMessage,
    queue: impl FnOnce(&Channel, u64, Message) -> Result<(), SubmitError>,
) -> Result<(), HostError> {
    let message = Message {
        kind: m.kind,
        payload: m.payload,
    };
    queue(vm.channel(), m.stream, message)
        .map_err(|e| moved(vm).unwrap_or_else(|| submit_error(&vm.id, e)))
}

impl Host {
    /// Queues a request on VM `id`'s channel, opening its stream.
    pub fn channel_submit(&self, id: &str, m: ChannelMessage) -> Result<(), HostError> {
        send(&*self.get(id)?, m, Channel::submit)
    }

    /// Sends a control message (a cancel) to an open stream of VM `id`.
    pub fn channel_signal(&self, id: &str, m: ChannelMessage) -> Result<(), HostError> {
        send(&*self.get(id)?, m, Channel::signal)
    }

    /// The responses of `stream` of VM `id` from index `from` on, waiting up to `wait`
    /// (at most `MAX_READ_WAIT`) for one; `reading` says whether those before `from` are
    /// let go of. Blocks: call it off the async runtime.
    pub fn channel_read(
        &self,
        id: &str,
        stream: u64,
        from: usize,
        wait: Duration,
        reading: Reading,
    ) -> Result<StreamChunk, HostError> {
        let vm = self.get(id)?;
        if let Some(moved) = moved(&vm) {
            return Err(moved);
        }
        let read = vm
            .channel()
            .read_as(stream, from, wait.min(MAX_READ_WAIT), reading)
            .map_err(|e| match e {
                ReadError::NoSuchStream(s) => moved(&vm).unwrap_or_else(|| {
                    HostError::StreamNotFound(format!("VM {id} has no stream {s}"))
                }),
                e @ ReadError::LetGo { .. } => HostError::Conflict(e.to_string()),
                e @ ReadError::Beyond { .. } => HostError::BadRequest(format!("VM {id}: {e}")),
            })?;
        Ok(StreamChunk {
            from,
            events: read
                .events
                .into_iter()
                .map(|m| StreamEvent {
                    kind: m.kind,
                    payload: m.payload,
                })
                .collect(),
            end: match read.end {
                channel::StreamEnd::Open => StreamEnd::Open,
                channel::StreamEnd::Final => StreamEnd::Final,
                channel::StreamEnd::Overflow => StreamEnd::Overflow,
                channel::StreamEnd::VmEnded => StreamEnd::VmEnded,
            },
        })
    }

    /// Forgets `stream` of VM `id` (its reader has it all, or gave up: an open stream's
    /// guest is told, unless a cancel went to it). A VM that migrated away
    /// holds the stream on its destination (the caller is told to release it there), and
    /// one paused for a switchover may (the caller is told to try again shortly).
    pub fn channel_release(&self, id: &str, stream: u64) -> Result<(), HostError> {
        let vm = self.get(id)?;
        vm.channel()
            .release(stream)
            .map_err(|e| moved(&vm).unwrap_or_else(|| submit_error(&vm.id, e)))
    }
}
