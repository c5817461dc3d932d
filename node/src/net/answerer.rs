//! The thread that answers inbound requests.
//!
//! One long-lived thread takes requests from a bounded queue and answers
//! them in batches: every request in a batch is checked, looked up and
//! audited, the audit entries are made durable with one sync, and only then
//! are the answers handed back to the event loop. While the thread waits on
//! one batch's sync, the next batch queues up, so under load one sync serves
//! many answers. A blocking-pool task per request cost two thread wake-ups
//! and a sync of its own for each.

use std::sync::Arc;
use std::sync::mpsc::{Receiver, SyncSender, TrySendError};

use careweave_protocol::PeerIdBytes;
use careweave_protocol::envelope::ProtocolId;
use libp2p::PeerId;
use libp2p::request_response::ResponseChannel;
use tokio::sync::mpsc;

use super::{Finished, unix_now};
use crate::node::{BatchedRequest, Node};

/// Most requests answered under one audit sync. It bounds how long the
/// first request of a batch waits for the others to be answered.
const MAX_BATCH: usize = 16;

/// One inbound request for the answering thread.
pub(super) struct Job {
    pub(super) protocol: ProtocolId,
    pub(super) peer: PeerId,
    pub(super) remote: PeerIdBytes,
    pub(super) request: Vec<u8>,
    pub(super) channel: ResponseChannel<Vec<u8>>,
    /// Answer "busy" instead of handling it.
    pub(super) busy: bool,
}

/// The event loop's end of the queue.
pub(super) struct Answerer {
    jobs: SyncSender<Job>,
}

impl Answerer {
    /// Starts the answering thread with a queue of `capacity` requests. The
    /// thread stops when this handle is dropped or the event loop's end of
    /// `finished` closes.
    pub(super) fn start(
        node: Arc<Node>,
        capacity: usize,
        finished: mpsc::Sender<Finished>,
    ) -> std::io::Result<Self> {
        let (jobs, queue) = std::sync::mpsc::sync_channel(capacity.max(1));
        std::thread::Builder::new()
            .name("careweave-answer".to_owned())
            .spawn(move || answer_until_closed(&node, &queue, &finished))?;
        Ok(Self { jobs })
    }

    /// Queues a request without waiting. If the queue is full or the
    /// thread has stopped, the request is dropped, which tells its sender
    /// it failed.
    pub(super) fn submit(&self, job: Job) -> Result<(), NotQueued> {
        self.jobs.try_send(job).map_err(|e| match e {
            TrySendError::Full(_) => NotQueued::Full,
            TrySendError::Disconnected(_) => NotQueued::Stopped,
        })
    }
}

/// Why a request could not be queued for the answering thread.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub(super) enum NotQueued {
    #[error("the answering queue is full")]
    Full,
    #[error("the answering thread has stopped")]
    Stopped,
}

fn answer_until_closed(node: &Node, queue: &Receiver<Job>, finished: &mpsc::Sender<Finished>) {
    while let Ok(first) = queue.recv() {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match queue.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        let requests = batch.iter().map(|job| BatchedRequest {
            protocol: job.protocol,
            bytes: &job.request,
            remote: &job.remote,
            busy: job.busy,
        });
        let answers = node.answer_batch(requests, unix_now());
        for (job, inbound) in batch.into_iter().zip(answers) {
            let done = Finished {
                protocol: job.protocol,
                peer: job.peer,
                channel: job.channel,
                inbound,
            };
            if finished.blocking_send(done).is_err() {
                return;
            }
        }
    }
}
