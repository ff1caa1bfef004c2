//! The call's briefing: what `POST /calls` stored for it and what the business's context
//! endpoint answers, merged into the session's first configuration. The session is configured
//! only once both are known (or the endpoint's deadline passed), so the first thing the agent
//! hears already includes them; the OpenAI upgrade runs meanwhile.

use std::time::Instant;

use super::{Action, BusinessOutcome, CallCore, SideTask, TaskId};
use crate::call::agent::{self, ContextAnswer, OutboundBrief, Variables};
use crate::call::leg::MediaLeg;
use crate::call::link::AgentLink;
use crate::metrics::ContextOutcome;
use crate::openai::events;

#[derive(Debug, Default)]
pub(super) struct Briefing {
    outbound: Lookup,
    business: BusinessContext,
}

/// What `POST /calls` stored for the call.
#[derive(Debug, Default)]
enum Lookup {
    /// `start` has not arrived yet.
    #[default]
    NotAsked,
    Pending(TaskId),
    Known(Option<OutboundBrief>),
}

/// The business's context endpoint.
#[derive(Debug, Default)]
enum BusinessContext {
    /// The agent has no `context_url`.
    #[default]
    NotNeeded,
    /// The request carries the variables `POST /calls` stored, which are being read.
    AwaitingVariables,
    Pending {
        task: TaskId,
        deadline: Instant,
    },
    /// `None` when the endpoint failed or was late: the agent's own settings apply.
    Known(Option<ContextAnswer>),
}

impl Briefing {
    /// When the context endpoint's answer stops being waited for.
    pub(super) fn deadline(&self) -> Option<Instant> {
        match self.business {
            BusinessContext::Pending { deadline, .. } => Some(deadline),
            _ => None,
        }
    }

    fn is_complete(&self) -> bool {
        matches!(self.outbound, Lookup::Known(_))
            && matches!(
                self.business,
                BusinessContext::NotNeeded | BusinessContext::Known(_)
            )
    }
}

impl<L: MediaLeg> CallCore<L> {
    /// `start` was accepted: look up what the call needs before its agent is configured.
    pub(super) fn start_briefing(&mut self, placed_by_us: bool, now: Instant) {
        let Some(call_sid) = self.streaming_call_sid() else {
            return;
        };
        self.briefing.outbound = if placed_by_us {
            Lookup::Pending(self.spawn(SideTask::LookupCallContext { call_sid }))
        } else {
            Lookup::Known(None)
        };
        if self.agent.context_url.is_none() {
            self.briefing.business = BusinessContext::NotNeeded;
        } else if placed_by_us {
            self.briefing.business = BusinessContext::AwaitingVariables;
        } else {
            self.ask_for_context(&Variables::new(), now);
        }
    }

    fn ask_for_context(&mut self, variables: &Variables, now: Instant) {
        let (Some(url), Some(call_sid)) = (self.agent.context_url.clone(), self.call_sid()) else {
            return;
        };
        let body = agent::context_request(call_sid, &self.agent.name, &self.parties, variables);
        let timeout = self.agent.context_timeout;
        let task = self.spawn(SideTask::AskBusiness { url, body, timeout });
        self.briefing.business = BusinessContext::Pending {
            task,
            deadline: now + timeout,
        };
    }

    pub(super) fn on_outbound_brief(
        &mut self,
        id: TaskId,
        result: Result<Option<OutboundBrief>, String>,
        now: Instant,
    ) {
        if !matches!(self.briefing.outbound, Lookup::Pending(pending) if pending == id) {
            return;
        }
        let found = result.unwrap_or_else(|error| {
            tracing::error!(%error, "cannot read the outbound call's context");
            None
        });
        if matches!(self.briefing.business, BusinessContext::AwaitingVariables) {
            let variables = found
                .as_ref()
                .map(|brief| brief.variables.clone())
                .unwrap_or_default();
            self.ask_for_context(&variables, now);
        }
        self.briefing.outbound = Lookup::Known(found);
        self.configure_agent_when_ready(now);
    }

    /// The context endpoint answered (or failed); a late answer finds the briefing complete
    /// and is never applied.
    pub(super) fn on_context_answer(&mut self, id: TaskId, outcome: BusinessOutcome, now: Instant) {
        if !matches!(self.briefing.business, BusinessContext::Pending { task, .. } if task == id) {
            return;
        }
        let answer = match outcome {
            BusinessOutcome::Answered { status, body } if (200..300).contains(&status) => {
                ContextAnswer::parse(&body).map_err(|why| (ContextOutcome::Refused, why))
            }
            BusinessOutcome::Answered { status, .. } => Err((
                ContextOutcome::Refused,
                format!("the context endpoint answered HTTP {status}"),
            )),
            BusinessOutcome::TimedOut => {
                Err((ContextOutcome::Timeout, self.context_timeout_reason()))
            }
            BusinessOutcome::Unreachable(error) => Err((
                ContextOutcome::Unreachable,
                format!("cannot reach the context endpoint: {error}"),
            )),
        };
        match answer {
            Ok(answer) => {
                self.metrics.context_requested(ContextOutcome::Ok);
                self.briefing.business = BusinessContext::Known(Some(answer));
            }
            Err((outcome, why)) => self.context_failed(outcome, why, now),
        }
        self.configure_agent_when_ready(now);
    }

    pub(super) fn briefing_timer(&mut self, now: Instant) {
        if self
            .briefing
            .deadline()
            .is_some_and(|deadline| now >= deadline)
        {
            let why = self.context_timeout_reason();
            self.context_failed(ContextOutcome::Timeout, why, now);
            self.configure_agent_when_ready(now);
        }
    }

    fn context_timeout_reason(&self) -> String {
        format!(
            "the context endpoint did not answer within {} ms",
            self.agent.context_timeout.as_millis()
        )
    }

    fn context_failed(&mut self, outcome: ContextOutcome, why: String, now: Instant) {
        self.metrics.context_requested(outcome);
        tracing::warn!(reason = %why, "no call context: the call goes on with the agent's own settings");
        self.record_event("context_failed", outcome.label(), Some(why), now);
        self.briefing.business = BusinessContext::Known(None);
    }

    /// Configures the fresh session once both it and the call's briefing are there, then sends
    /// the caller audio that arrived meanwhile.
    pub(super) fn configure_agent_when_ready(&mut self, now: Instant) {
        if !matches!(self.link, AgentLink::AwaitingContext) || !self.briefing.is_complete() {
            return;
        }
        if self.is_reconnecting() {
            self.configure_reconnected(now);
            return;
        }
        let outbound = match &self.briefing.outbound {
            Lookup::Known(found) => found.as_ref(),
            Lookup::NotAsked | Lookup::Pending(_) => None,
        };
        let answer = match &self.briefing.business {
            BusinessContext::Known(answer) => answer.as_ref(),
            _ => None,
        };
        let brief = agent::brief(
            &self.agent.instructions,
            self.agent.greeting.as_deref(),
            outbound,
            answer,
        );
        let update = events::session_update(&self.agent, &brief.instructions);
        self.actions.push_back(Action::ToAgent(update));
        // Context goes in before anything can make the agent speak.
        for message in &brief.system_messages {
            self.actions
                .push_back(Action::ToAgent(events::system_message(message)));
        }
        if let Some(greeting) = &brief.greeting {
            self.actions
                .push_back(Action::ToAgent(events::system_message(greeting)));
            self.actions
                .push_back(Action::ToAgent(events::response_create()));
            self.tools.note_response_requested();
        }
        self.instructions = brief.instructions;
        self.system_messages = brief.system_messages;
        self.flush_early_audio();
        self.link = AgentLink::Ready;
        self.session_ready_at = Some(now);
    }
}
