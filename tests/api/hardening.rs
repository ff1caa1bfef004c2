//! Correctly signed requests that Twilio did not send as they arrive: folded captures (text moved
//! between adjacent parameters, which the signature cannot see), other accounts, malformed ids,
//! statuses and directions.

use crate::helpers::*;

const VOICE_URL: &str = "https://callbridge.test/voice";

/// Asserts a refusal: 403 with an empty body.
async fn assert_refused(response: reqwest::Response, case: &str) {
    assert_eq!(response.status(), 403, "{case}");
    assert_eq!(response.text().await.unwrap(), "", "{case}");
}

async fn stream_tokens(app: &TestApp) -> i64 {
    sqlx::query_scalar::<_, i64>("SELECT COUNT(*) FROM stream_tokens")
        .fetch_one(app.state.store.pool())
        .await
        .unwrap()
}

#[tokio::test]
async fn folded_copies_of_a_signed_voice_request_are_refused_and_open_nothing() {
    let app = spawn_app(&[]).await;
    let captured = voice_form(&call_sid(1));
    let signature = twilio_signature(VOICE_URL, &captured);

    // Sorted, Twilio signs: AccountSid ApiVersion CallSid CallStatus Direction From To.
    let mut folds = vec![
        (
            "CallSid swallows CallStatus",
            swallow_next(&captured, "CallSid", 1),
        ),
        (
            "CallSid swallows up to Direction",
            swallow_next(&captured, "CallSid", 2),
        ),
        (
            "CallSid swallows up to From",
            swallow_next(&captured, "CallSid", 3),
        ),
        (
            "CallSid swallows every later field",
            swallow_next(&captured, "CallSid", 4),
        ),
        (
            "ApiVersion swallows CallSid",
            swallow_next(&captured, "ApiVersion", 1),
        ),
        (
            "AccountSid swallows ApiVersion",
            swallow_next(&captured, "AccountSid", 1),
        ),
        (
            "CallStatus swallows Direction",
            swallow_next(&captured, "CallStatus", 1),
        ),
        (
            "Direction swallows From",
            swallow_next(&captured, "Direction", 1),
        ),
    ];
    // The tail of the last value can also become a new (lower-case, so last) name: CallSid takes
    // everything up to To's name, and To's value becomes a field of its own.
    let mut renamed = swallow_next(&captured, "CallSid", 3);
    let to = renamed.pop().unwrap();
    renamed.iter_mut().find(|(n, _)| n == "CallSid").unwrap().1 += &to.0;
    renamed.push((to.1, String::new()));
    folds.push((
        "CallSid takes To's name, To's value becomes a name",
        renamed,
    ));

    for (case, folded) in &folds {
        assert_ne!(folded, &captured, "{case}");
        assert_eq!(
            twilio_signature(VOICE_URL, folded),
            signature,
            "{case}: the fold keeps the signature"
        );
        let response = app.post_form("/voice", folded, Some(&signature)).await;
        assert_refused(response, case).await;
    }
    assert_eq!(app.state.metrics.webhooks_refused.get(), folds.len() as u64);
    assert_eq!(app.state.metrics.signature_failures.get(), 0);
    assert_eq!(app.state.admission.occupancy().pending, 0, "no slot taken");
    assert_eq!(stream_tokens(&app).await, 0, "no stream token issued");
    assert!(
        app.state
            .store
            .list_calls(100, None)
            .await
            .unwrap()
            .is_empty(),
        "no call recorded"
    );

    // The capture itself is still the one call it always was.
    let original = app.post_form("/voice", &captured, Some(&signature)).await;
    assert_eq!(original.status(), 200);
    assert_eq!(stream_tokens(&app).await, 1);
}

#[tokio::test]
async fn folded_status_callbacks_and_permission_replies_are_refused() {
    let app = spawn_app(&[]).await;
    let status = form(&[
        ("CallSid", &call_sid(2)),
        ("AccountSid", ACCOUNT_SID),
        ("CallStatus", "completed"),
        ("SequenceNumber", "3"),
    ]);
    let reply = permission_reply_form(&format!("SM{:032}", 7), "ACCEPTED");
    for (path, folded, original) in [
        (
            "/voice/status",
            swallow_next(&status, "CallSid", 1),
            &status,
        ),
        (
            "/voice/status",
            swallow_next(&status, "CallStatus", 1),
            &status,
        ),
        ("/messaging", swallow_next(&reply, "MessageSid", 1), &reply),
        ("/messaging", swallow_next(&reply, "From", 1), &reply),
    ] {
        let url = format!("{PUBLIC_BASE_URL}{path}");
        let signature = twilio_signature(&url, original);
        assert_eq!(twilio_signature(&url, &folded), signature, "{path}");
        assert_refused(app.post_form(path, &folded, Some(&signature)).await, path).await;
    }
    assert_eq!(app.state.metrics.webhooks_refused.get(), 4);
    assert!(
        app.state
            .store
            .list_calls(10, None)
            .await
            .unwrap()
            .is_empty()
    );
}

#[tokio::test]
async fn signed_webhooks_for_another_account_or_none_are_refused() {
    let app = spawn_app(&[]).await;
    let status = |account_sid: Option<&str>| {
        let mut params = form(&[("CallSid", &call_sid(3)), ("CallStatus", "ringing")]);
        params.extend(account_sid.map(|sid| ("AccountSid".to_owned(), sid.to_owned())));
        params
    };
    let with_account = |mut params: Vec<(String, String)>, account_sid: Option<&str>| {
        params.retain(|(name, _)| name != "AccountSid");
        params.extend(account_sid.map(|sid| ("AccountSid".to_owned(), sid.to_owned())));
        params
    };
    let voice = voice_form(&call_sid(4));
    let reply = permission_reply_form(&format!("SM{:032}", 8), "ACCEPTED");
    for account_sid in [Some(OTHER_ACCOUNT_SID), None] {
        for (path, params) in [
            ("/voice", with_account(voice.clone(), account_sid)),
            ("/voice/status", status(account_sid)),
            ("/messaging", with_account(reply.clone(), account_sid)),
        ] {
            let case = format!("{path} for {account_sid:?}");
            assert_refused(app.post_signed(path, &params).await, &case).await;
        }
    }
    assert_eq!(app.state.metrics.webhooks_refused.get(), 6);
    assert_eq!(app.state.admission.occupancy().pending, 0);
    assert!(
        app.state
            .store
            .list_calls(10, None)
            .await
            .unwrap()
            .is_empty()
    );

    // The same requests for our account are served.
    assert_eq!(app.post_signed("/voice", &voice).await.status(), 200);
    let ours = status(Some(ACCOUNT_SID));
    assert_eq!(app.post_signed("/voice/status", &ours).await.status(), 204);
    assert_eq!(app.post_signed("/messaging", &reply).await.status(), 204);
}

#[tokio::test]
async fn signed_webhooks_with_malformed_ids_statuses_or_directions_are_refused() {
    let app = spawn_app(&[]).await;
    let with = |mut params: Vec<(String, String)>, name: &str, value: &str| {
        params.iter_mut().find(|(n, _)| n == name).unwrap().1 = value.to_owned();
        params
    };
    let voice = voice_form(&call_sid(5));
    let reply = permission_reply_form(&format!("SM{:032}", 9), "ACCEPTED");
    let mut replying_to = reply.clone();
    replying_to.push(("OriginalRepliedMessageSid".into(), "MM1".into()));
    let cases = [
        ("/voice", with(voice.clone(), "CallSid", "CA1")),
        (
            "/voice",
            with(voice.clone(), "CallSid", &format!("CA{:033}", 5)),
        ),
        (
            "/voice",
            with(voice.clone(), "CallSid", &format!("SM{:032}", 5)),
        ),
        ("/voice", with(voice.clone(), "AccountSid", "AC1")),
        ("/voice/status", with(voice.clone(), "CallSid", "CA_x")),
        // `answered` names a status-callback event; the callback itself says `in-progress`.
        ("/voice", with(voice.clone(), "CallStatus", "answered")),
        ("/voice", with(voice.clone(), "Direction", "outbound")),
        (
            "/voice/status",
            with(voice.clone(), "CallStatus", "in_progress"),
        ),
        ("/voice/status", with(voice.clone(), "Direction", "Inbound")),
        ("/messaging", with(reply.clone(), "MessageSid", "SM_a")),
        (
            "/messaging",
            with(reply.clone(), "MessageSid", &call_sid(9)),
        ),
        ("/messaging", replying_to),
    ];
    for (path, params) in &cases {
        assert_refused(app.post_signed(path, params).await, path).await;
    }
    assert_eq!(app.state.metrics.webhooks_refused.get(), cases.len() as u64);
    assert_eq!(app.state.admission.occupancy().pending, 0);
    assert!(
        app.state
            .store
            .list_calls(10, None)
            .await
            .unwrap()
            .is_empty(),
        "no call recorded"
    );

    let text = app.get("/metrics").await.text().await.unwrap();
    assert!(
        text.contains(&format!(
            "callbridge_webhooks_refused_total {}\n",
            cases.len()
        )),
        "{text}"
    );
}
