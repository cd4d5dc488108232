"""The web dashboard: queues, workers, dead letters and tasks, on SQS and SQLite alike.

The page logic lives here, free of any web framework: :mod:`~ebsqs.dashboard.pages` turns
broker counts and masters' status documents into rows, :mod:`~ebsqs.dashboard.history` keeps
the queues page's samples, :mod:`~ebsqs.dashboard.deadletters` browses, redrives and deletes
dead letters, :mod:`~ebsqs.dashboard.render` writes the HTML (escaped, no JavaScript framework,
sparklines as inline SVG), :mod:`~ebsqs.dashboard.assets` ships the stylesheet and script in
the package, and :mod:`~ebsqs.dashboard.service` ties them into one :class:`Dashboard` per set
of queues. Two front ends use it: ``ebsqs dashboard`` (:mod:`~ebsqs.dashboard.server`, on
waitress) and the Django views of :mod:`ebsqs.contrib.django.views`.
:mod:`~ebsqs.dashboard.publish` names the extensions a master publishes its snapshot with.

Importing this package does nothing: no broker, no server, no settings read.
"""
