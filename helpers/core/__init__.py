"""The core every notebook and technique package uses: runtime (device, backend, versions, seeding), results
(atomic writes with provenance), report (the HTML gallery), plotting (one figure style), stats (IQM, bootstrap
CIs), timing (the one median timer, peak-RSS delta and single-thread context every benchmark uses) and notebook
(the smoke profile of an interactive run, keeping the values the user edited).

Nothing here imports a technique package: arrows run notebooks -> studies -> building blocks -> core.
"""
