"""What the tests share: the run's names and services (world), processes (procs),
talking to the API (api), private installations (isolated), the client and
orchestrator environments (client, venvs). Never imported from conftest.py."""
