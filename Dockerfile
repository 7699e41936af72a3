# deployer in a container: mount the host's Docker socket (and credentials) into it.
#   docker build -t deployer .
#   docker run -d --name deployer -p 4500:4500 -v /var/run/docker.sock:/var/run/docker.sock \
#       -e DEPLOYER_WEBHOOK_TOKEN=... deployer --etcd_nodes=http://10.0.0.1:2379
FROM python:3.11-slim
WORKDIR /app
COPY setup.py README.md ./
COPY deployer ./deployer
COPY twisted ./twisted
RUN pip install --no-cache-dir . \
    && python -c "from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))" \
    && useradd --system --home-dir /app deployer
ENV PYTHONUNBUFFERED=1
EXPOSE 4500
# The daemon needs the Docker socket; run it as root or as a user in the socket's group.
ENTRYPOINT ["twistd", "--nodaemon", "--pidfile=", "deployer"]
