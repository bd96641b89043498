"""``GET /calibrators``: list the stored calibrator versions with their metrics."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends

from service.api.calibrators.protocol import CalibratorsResponse, CalibratorVersion
from service.api.common import AppState, ErrorResponse, ServiceUnavailable, app_state
from service.recalibration import record_to_json

router = APIRouter()


@router.get(
    "/calibrators",
    response_model=CalibratorsResponse,
    responses={503: {"model": ErrorResponse, "description": "The store is not open."}},
)
async def get_calibrators(state: Annotated[AppState, Depends(app_state)]) -> CalibratorsResponse:
    """Active and past calibrator versions of every (model, method, mode, task), with the
    cross-validated metrics before and after calibration."""
    if state.store is None:
        raise ServiceUnavailable("the score store is not open")
    versions = await state.store.calibrator_versions()
    return CalibratorsResponse(
        calibrators=[CalibratorVersion.model_validate(record_to_json(v)) for v in versions]
    )
