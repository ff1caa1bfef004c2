//! `GET /openapi.json`: the OpenAPI 3.1 document of the bearer-authenticated API, generated
//! from the handlers' annotations and the types they read and answer with, so that a
//! generated client (or a schema-based fuzzer) works against the server unmodified.

use std::sync::LazyLock;

use actix_web::HttpResponse;
use utoipa::openapi::schema::{ObjectBuilder, Schema, Type};
use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
use utoipa::openapi::{RefOr, ServerBuilder};
use utoipa::{Modify, OpenApi};

use super::{calls, events, outbound};

#[derive(OpenApi)]
#[openapi(
    info(
        title = "callbridge API",
        description = "Calls between WhatsApp users and OpenAI Realtime agents through Twilio: \
                       call permissions, outbound calls, call records and transcripts, and the \
                       events sent to the business. Every route takes \
                       `Authorization: Bearer <CALLBRIDGE_API_TOKEN>`; every error answers \
                       `{\"error\":{\"code\":…,\"message\":…}}`."
    ),
    paths(
        outbound::request_permission,
        outbound::place_call,
        calls::list_calls,
        calls::get_call,
        outbound::hang_up,
        events::list_events,
        events::retry_event,
    ),
    modifiers(&BearerAuth),
    security(("bearer" = []))
)]
struct ApiDoc;

/// The `bearer` scheme every operation names.
struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(Http::new(HttpAuthScheme::Bearer)),
        );
        openapi.servers = Some(vec![ServerBuilder::new().url("/").build()]);
    }
}

/// Built once: the document depends only on the code.
static DOCUMENT: LazyLock<String> = LazyLock::new(|| {
    ApiDoc::openapi()
        .to_json()
        .expect("the OpenAPI document serialises")
});

/// The document as JSON text, for tests and tooling.
pub fn document() -> &'static str {
    &DOCUMENT
}

pub async fn openapi_json() -> HttpResponse {
    HttpResponse::Ok()
        .content_type("application/json")
        .body(document())
}

/// A string schema with exactly these values: the enums this API writes as Twilio's words.
pub fn string_enum(values: impl IntoIterator<Item = &'static str>) -> RefOr<Schema> {
    ObjectBuilder::new()
        .schema_type(Type::String)
        .enum_values(Some(values))
        .into()
}
