"""Gathers one router per resource."""

from fastapi import APIRouter

from app.api.routes import datasets, health, jobs, runs

api_router = APIRouter()
for module in (health, datasets, jobs, runs):
    api_router.include_router(module.router)
