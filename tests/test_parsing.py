from common.parsing import ParseStats, chat_parsed, coerce_int, is_placeholder, parse_json

# Outputs seen from real models (SmolLM2-135M on the AILO prompts, and typical GPT-style replies).
FENCED = '```json\n{\n  "reason": "The system asked about genres.",\n  "policy": "respond_to_clarification"\n}\n```'
PROSE_AROUND = 'Sure! Here is my answer: {"reason": "ok", "rating": "4"} Hope this helps.'
TRAILING_COMMA = '{"reason": "coherent", "rating": 3,}'
SINGLE_QUOTES = "{'reason': 'fine', 'response': 'Something with sharks?'}"
TRUNCATED = '{"reason": "The system recommended a film that fits the mood, but it'
TWO_OBJECTS = '{"reason": "a", "rating": "5"}\n{"reason": "b", "rating": "1"}'
SMART_QUOTES = "{\u201creason\u201d: \u201cgood\u201d, \u201crating\u201d: \u201c4\u201d}"
NO_JSON = 'The user is looking for a movie for tonight.\n\nThe system just said: "Sure! What genres do you like?"'


def test_parse_json_on_malformed_outputs():
    assert parse_json(FENCED)["policy"] == "respond_to_clarification"
    assert parse_json(PROSE_AROUND) == {"reason": "ok", "rating": "4"}
    assert parse_json(TRAILING_COMMA) == {"reason": "coherent", "rating": 3}
    assert parse_json(SINGLE_QUOTES)["response"] == "Something with sharks?"
    assert parse_json(TRUNCATED) == {"reason": "The system recommended a film that fits the mood, but it"}
    assert parse_json(TWO_OBJECTS)["reason"] == "a"
    assert parse_json(SMART_QUOTES)["rating"] == "4"
    assert parse_json(NO_JSON) is None
    assert parse_json("[1, 2, 3]") is None  # not an object


def test_coerce_int_rejects_placeholders():
    assert coerce_int("4", 0, 5) == 4 and coerce_int("4.7", 0, 5) == 4 and coerce_int("4/5", 0, 5) == 4
    assert coerce_int(9, 0, 5) == 5 and coerce_int("-2", 0, 5) == 0
    assert coerce_int("<Final rating from 0 to 5 >", 0, 5) is None
    assert coerce_int("three", 0, 5) is None
    assert is_placeholder("<your message to the system>") and not is_placeholder("I like <b>bold</b> films")


def test_chat_parsed_retries_only_failures_and_counts(scripted_llm):
    calls = {"n": 0}

    def respond(prompt):
        calls["n"] += 1
        if prompt == "good":
            return '{"rating": "5"}'
        if prompt == "flaky" and calls["n"] > 3:
            return '{"rating": "2"}'
        return "no json here"

    llm = scripted_llm(respond)
    stats = ParseStats()
    parsed, raw = chat_parsed(
        llm,
        [[{"role": "user", "content": p}] for p in ["good", "flaky", "bad"]],
        lambda t: (parse_json(t) or {}).get("rating"),
        stats,
        max_tries=3,
    )
    assert parsed == ["5", "2", None]
    assert raw[2] == "no json here"
    assert llm.prompts.count("good") == 1  # never re-asked
    assert (stats.attempts, stats.retries, stats.failures) == (3 + 2 + 1, 3, 1)


def test_chat_parsed_retries_at_a_fixed_temperature_when_given():
    class Recorder:
        def __init__(self):
            self.temperatures = []

        def chat(self, conversations, temperature=0.0, max_tokens=256, stop=None):
            self.temperatures.append(temperature)
            return [[""] for _ in conversations]  # never parses

    stepped, fixed = Recorder(), Recorder()
    chat_parsed(stepped, [[{"role": "user", "content": "x"}]], lambda t: t or None, ParseStats(), max_tries=3)
    stats = ParseStats()
    chat_parsed(
        fixed,
        [[{"role": "user", "content": "x"}]],
        lambda t: t or None,
        stats,
        max_tries=3,
        temperature=0.0,
        retry_temperature=1.0,
    )
    assert stepped.temperatures == [0.0, 0.3, 0.6]
    assert fixed.temperatures == [0.0, 1.0, 1.0] and (stats.retries, stats.failures) == (2, 1)
