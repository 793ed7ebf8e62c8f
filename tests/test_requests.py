"""One request type, validated in one place, with typed errors that survive the worker's pipe."""

import pickle

import pytest

from model import requests as rq
from model.requests import BadBox, BadExpression, Request, RequestError, validate
from service.errors import BadBox as ServiceBadBox
from service.errors import BadExpression as ServiceBadExpression
from service.errors import BadRequest, from_core


def test_every_task_has_one_name_and_a_paper_task():
    assert rq.TASKS == ("caption", "refer", "describe", "ground")
    assert {rq.PAPER_TASKS[t] for t in rq.TASKS} == {"Cap", "ARef", "GCap"}


@pytest.mark.parametrize("request_, error, field", [
    (Request("propose"), RequestError, "task"),
    (Request("refer", expression="  "), BadExpression, "expression"),
    (Request("refer"), RequestError, "expression"),
    (Request("caption", expression="x"), RequestError, "expression"),
    (Request("describe"), RequestError, "box"),
    (Request("describe", box=(50, 50, 10, 10)), BadBox, "box"),
    (Request("describe", box=(500, 0, 600, 10)), BadBox, "box"),
    (Request("refer", expression="x", grounded=True), RequestError, "grounded"),
    (Request("ground", max_regions=rq.MAX_REGIONS + 1), RequestError, "max_regions"),
    (Request("ground", max_regions=0), RequestError, "max_regions"),
    (Request("caption", max_new_tokens=0), RequestError, "max_new_tokens"),
])
def test_validate_names_what_is_wrong(request_, error, field):
    with pytest.raises(error) as e:
        validate(request_, (200, 100))
    assert type(e.value) is error and e.value.field == field


def test_validate_clips_a_box_and_passes_good_requests_unchanged():
    assert validate(Request("describe", box=(-5, 10, 50, 500)), (200, 100)).box == (0.0, 10.0, 50.0, 100.0)
    ok = Request("caption", grounded=True, max_new_tokens=8)
    assert validate(ok, (200, 100)) is ok
    with pytest.raises(BadBox):
        rq.check_box((0, 0, True, 5), 10, 10)  # a boolean is not a coordinate


def test_errors_keep_their_type_and_field_across_a_pipe_and_map_to_the_service_codes():
    for e, service in ((BadBox("outside", "box"), ServiceBadBox), (BadExpression("empty", "expression"),
                                                                   ServiceBadExpression),
                       (RequestError("budget", "max_new_tokens"), BadRequest)):
        back = pickle.loads(pickle.dumps(e))
        assert type(back) is type(e) and back.field == e.field and back.message == e.message
        mapped = pickle.loads(pickle.dumps(from_core(back)))  # the worker sends the service error
        assert type(mapped) is service and mapped.status == 400 and mapped.message == e.message


def test_the_grpc_client_honours_the_standard_pushback_before_retry_after():
    from client.sdk import pushback

    assert pushback({"grpc-retry-pushback-ms": "250", "retry-after": "3"}) == (0.25, True)
    assert pushback({"grpc-retry-pushback-ms": "-1"}) == (None, False)  # gRFC A6: do not retry
    assert pushback({"grpc-retry-pushback-ms": "soon"}) == (None, False)
    assert pushback({"retry-after": "2"}) == (2.0, True) and pushback({}) == (None, True)
