//! Each collector runs on a thread of its own, so a family whose collection
//! hangs (a read that never returns, a map walk that takes minutes) costs its
//! own metrics for that interval and nothing else: the run loop waits for
//! each family up to a deadline, counts the one that misses it, and goes on.
//! A family still busy with an old collection is not asked again until it
//! comes back; its late result is dropped (its counters are cumulative, so
//! the next collection carries what it would have said).

use std::sync::mpsc;
use std::time::{Instant, SystemTime};

use super::{CollectError, Collector};
use crate::model::Metric;

/// What one collection of one collector gave.
pub struct Outcome {
    pub metrics: Vec<Metric>,
    pub result: Result<(), CollectError>,
    /// [`Collector::take_partial_errors`] after this collection.
    pub partial: Vec<(&'static str, &'static str)>,
}

/// Why a collector gave no [`Outcome`] this interval.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Missed {
    /// It did not finish within the deadline (this interval, or it is still
    /// busy with an earlier one).
    Deadline,
    /// Its thread panicked; the family stays without metrics until restart.
    Panicked,
}

impl Missed {
    /// The `error.type` attribute of `perch.collector.errors`.
    pub fn kind(self) -> &'static str {
        match self {
            Missed::Deadline => "deadline",
            Missed::Panicked => "panic",
        }
    }
}

/// A collector on its own thread.
pub struct Worker {
    name: &'static str,
    ask: Option<mpsc::Sender<SystemTime>>,
    done: mpsc::Receiver<Outcome>,
    /// Asked and not yet answered.
    busy: bool,
    dead: bool,
}

impl Worker {
    /// Moves `collector` onto a thread named after it.
    pub fn spawn(mut collector: Box<dyn Collector>) -> std::io::Result<Worker> {
        let name = collector.name();
        let (ask, asked) = mpsc::channel::<SystemTime>();
        let (answer, done) = mpsc::channel::<Outcome>();
        std::thread::Builder::new()
            .name(format!("perch-{name}"))
            .spawn(move || {
                for now in asked {
                    let mut metrics = Vec::new();
                    let result = collector.collect(now, &mut metrics);
                    let partial = collector.take_partial_errors();
                    if answer
                        .send(Outcome {
                            metrics,
                            result,
                            partial,
                        })
                        .is_err()
                    {
                        break;
                    }
                }
            })?;
        Ok(Worker {
            name,
            ask: Some(ask),
            done,
            busy: false,
            dead: false,
        })
    }

    pub fn name(&self) -> &'static str {
        self.name
    }

    /// Asks for a collection at `now`, unless the previous one has not come
    /// back (a late answer that arrived since is dropped here). Returns
    /// whether it was asked.
    pub fn ask(&mut self, now: SystemTime) -> bool {
        if self.busy {
            match self.done.try_recv() {
                Ok(_late) => self.busy = false,
                Err(mpsc::TryRecvError::Empty) => return false,
                Err(mpsc::TryRecvError::Disconnected) => self.dead = true,
            }
        }
        if self.dead {
            return false;
        }
        match self.ask.as_ref().map(|a| a.send(now)) {
            Some(Ok(())) => {
                self.busy = true;
                true
            }
            _ => {
                self.dead = true;
                false
            }
        }
    }

    /// Waits for the answer to [`Worker::ask`] until `deadline`.
    pub fn wait(&mut self, deadline: Instant) -> Result<Outcome, Missed> {
        if self.dead {
            return Err(Missed::Panicked);
        }
        if !self.busy {
            // Not asked this interval: `ask` found it still busy.
            return Err(Missed::Deadline);
        }
        let left = deadline.saturating_duration_since(Instant::now());
        match self.done.recv_timeout(left) {
            Ok(outcome) => {
                self.busy = false;
                Ok(outcome)
            }
            Err(mpsc::RecvTimeoutError::Timeout) => Err(Missed::Deadline),
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                self.dead = true;
                Err(Missed::Panicked)
            }
        }
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        // Closing the channel ends the thread once it is back from any
        // collection in progress. It is not joined: a collection stuck in
        // the kernel must not stop the agent from exiting.
        self.ask.take();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    /// Sleeps `delay` per collection (a stuck read), then reports one gauge.
    struct Slow {
        delay: Duration,
        panic_on: Option<u32>,
        calls: u32,
    }

    impl Collector for Slow {
        fn name(&self) -> &'static str {
            "slow"
        }
        fn collect(&mut self, now: SystemTime, out: &mut Vec<Metric>) -> Result<(), CollectError> {
            self.calls += 1;
            if self.panic_on == Some(self.calls) {
                panic!("collector bug");
            }
            std::thread::sleep(self.delay);
            out.push(Metric::gauge(
                "test.calls",
                "",
                "",
                vec![crate::model::NumberPoint {
                    attributes: Vec::new(),
                    start_time: None,
                    time: now,
                    value: crate::model::Number::Int(self.calls.into()),
                }],
            ));
            Ok(())
        }
    }

    fn slow(delay_ms: u64, panic_on: Option<u32>) -> Worker {
        Worker::spawn(Box::new(Slow {
            delay: Duration::from_millis(delay_ms),
            panic_on,
            calls: 0,
        }))
        .unwrap()
    }

    #[test]
    fn a_stuck_collection_misses_its_deadline_and_is_not_asked_again_until_it_returns() {
        let mut w = slow(600, None);
        let t = Instant::now();
        assert!(w.ask(SystemTime::now()));
        assert_eq!(
            w.wait(t + Duration::from_millis(100)).err(),
            Some(Missed::Deadline)
        );
        assert!(
            t.elapsed() < Duration::from_millis(400),
            "{:?}",
            t.elapsed()
        );
        // Still busy: not asked, counted as missed again at once.
        assert!(!w.ask(SystemTime::now()));
        assert_eq!(w.wait(Instant::now()).err(), Some(Missed::Deadline));
        // Back: the late answer is dropped, the next collection is fresh.
        std::thread::sleep(Duration::from_millis(700));
        assert!(w.ask(SystemTime::now()));
        let o = w.wait(Instant::now() + Duration::from_secs(5)).unwrap();
        assert!(o.result.is_ok());
        assert_eq!(o.metrics[0].name, "test.calls");
        match &o.metrics[0].data {
            crate::model::Data::Gauge { points } => {
                assert_eq!(points[0].value, crate::model::Number::Int(2))
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_panicking_collector_is_reported_and_stays_down() {
        let mut w = slow(0, Some(2));
        assert!(w.ask(SystemTime::now()));
        assert!(w.wait(Instant::now() + Duration::from_secs(5)).is_ok());
        assert!(w.ask(SystemTime::now()));
        assert_eq!(
            w.wait(Instant::now() + Duration::from_secs(5)).err(),
            Some(Missed::Panicked)
        );
        assert!(!w.ask(SystemTime::now()));
        assert_eq!(w.wait(Instant::now()).err(), Some(Missed::Panicked));
    }
}
