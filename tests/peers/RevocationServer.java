// A plain Java 17 HttpsServer (JDK only) that requires a client certificate from our CA,
// refuses revoked callers from the chain CRL `trustmesh agent` keeps fresh, accepts only
// SPIFFE IDs of one trust domain, and picks up renewed files without a restart.
// Usage: java RevocationServer.java DIR CRL TRUST_DOMAIN
//   DIR: the agent's --out (chain.pem, key.pem, bundle.pem); CRL: the chain CRL file, PEM.
import com.sun.net.httpserver.HttpsConfigurator;
import com.sun.net.httpserver.HttpsExchange;
import com.sun.net.httpserver.HttpsParameters;
import com.sun.net.httpserver.HttpsServer;
import java.io.ByteArrayInputStream;
import java.net.InetSocketAddress;
import java.net.Socket;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.security.KeyFactory;
import java.security.Principal;
import java.security.PrivateKey;
import java.security.cert.CertPathBuilder;
import java.security.cert.CertStore;
import java.security.cert.CertificateException;
import java.security.cert.CertificateFactory;
import java.security.cert.CollectionCertStoreParameters;
import java.security.cert.PKIXBuilderParameters;
import java.security.cert.PKIXRevocationChecker;
import java.security.cert.TrustAnchor;
import java.security.cert.X509CRL;
import java.security.cert.X509Certificate;
import java.security.spec.PKCS8EncodedKeySpec;
import java.util.ArrayList;
import java.util.Base64;
import java.util.Collection;
import java.util.EnumSet;
import java.util.HashSet;
import java.util.List;
import java.util.Map;
import java.util.Set;
import java.util.concurrent.ConcurrentHashMap;
import javax.net.ssl.CertPathTrustManagerParameters;
import javax.net.ssl.SSLContext;
import javax.net.ssl.SSLEngine;
import javax.net.ssl.TrustManagerFactory;
import javax.net.ssl.X509ExtendedKeyManager;
import javax.net.ssl.X509ExtendedTrustManager;

public class RevocationServer {
    /** What the agent wrote, read together: this server's chain and key, the roots, the CRLs. */
    record Files_(String alias, X509Certificate[] chain, PrivateKey key, X509ExtendedTrustManager trust) {}

    static final CertificateFactory X509;
    static {
        try { X509 = CertificateFactory.getInstance("X.509"); } catch (Exception e) { throw new RuntimeException(e); }
    }

    /** PKIX with revocation on: every certificate of the chain is checked against the CRLs. */
    static X509ExtendedTrustManager pkixWithCrls(Collection<X509Certificate> roots, Collection<X509CRL> crls)
            throws Exception {
        Set<TrustAnchor> anchors = new HashSet<>();
        for (X509Certificate root : roots) anchors.add(new TrustAnchor(root, null));
        PKIXBuilderParameters params = new PKIXBuilderParameters(anchors, null);
        params.addCertStore(CertStore.getInstance("Collection", new CollectionCertStoreParameters(crls)));
        PKIXRevocationChecker revocation =
                (PKIXRevocationChecker) CertPathBuilder.getInstance("PKIX").getRevocationChecker();
        // CRLs from the file only: no OCSP, no fetching; no CRL for a certificate means refused
        revocation.setOptions(EnumSet.of(PKIXRevocationChecker.Option.PREFER_CRLS,
                PKIXRevocationChecker.Option.NO_FALLBACK));
        params.addCertPathChecker(revocation);
        params.setRevocationEnabled(true);
        TrustManagerFactory tmf = TrustManagerFactory.getInstance("PKIX");
        tmf.init(new CertPathTrustManagerParameters(params));
        return (X509ExtendedTrustManager) tmf.getTrustManagers()[0];
    }

    static PrivateKey pemKey(byte[] pem) throws Exception {
        String text = new String(pem, StandardCharsets.US_ASCII);
        String body = text.replaceAll("-----(BEGIN|END) PRIVATE KEY-----", "").replaceAll("\\s", "");
        PKCS8EncodedKeySpec spec = new PKCS8EncodedKeySpec(Base64.getDecoder().decode(body));
        for (String algorithm : List.of("EC", "RSA", "Ed25519")) {
            try { return KeyFactory.getInstance(algorithm).generatePrivate(spec); } catch (Exception e) { /* next */ }
        }
        throw new IllegalArgumentException("key.pem is not a PKCS#8 EC, RSA or Ed25519 key");
    }

    /** Reads DIR and the CRL again whenever one of them changes (polled every 200 ms). */
    static final class Reloading {
        private final Path dir;
        private final Path crl;
        private final Map<String, Files_> generations = new ConcurrentHashMap<>();
        private volatile Files_ current;
        private String seen = "";
        private int generation;

        Reloading(Path dir, Path crl) throws Exception {
            this.dir = dir;
            this.crl = crl;
            reload();
        }

        private String stamp() throws Exception {
            StringBuilder stamp = new StringBuilder();
            for (Path file : List.of(dir.resolve("chain.pem"), dir.resolve("key.pem"), dir.resolve("bundle.pem"), crl)) {
                stamp.append(Files.getLastModifiedTime(file)).append(Files.size(file)).append(';');
            }
            return stamp.toString();
        }

        synchronized void reload() throws Exception {
            String now = stamp();
            if (now.equals(seen)) return;
            List<X509Certificate> chain = new ArrayList<>();
            for (var cert : X509.generateCertificates(new ByteArrayInputStream(Files.readAllBytes(dir.resolve("chain.pem"))))) {
                chain.add((X509Certificate) cert);
            }
            PrivateKey key = pemKey(Files.readAllBytes(dir.resolve("key.pem")));
            List<X509Certificate> roots = new ArrayList<>();
            for (var cert : X509.generateCertificates(new ByteArrayInputStream(Files.readAllBytes(dir.resolve("bundle.pem"))))) {
                roots.add((X509Certificate) cert);
            }
            List<X509CRL> crls = new ArrayList<>();
            for (var one : X509.generateCRLs(new ByteArrayInputStream(Files.readAllBytes(crl)))) {
                crls.add((X509CRL) one);
            }
            String alias = "gen-" + (++generation);
            // a handshake asks for the chain and the key separately: keep the last generations
            generations.put(alias, new Files_(alias, chain.toArray(new X509Certificate[0]), key, pkixWithCrls(roots, crls)));
            generations.remove("gen-" + (generation - 3));
            current = generations.get(alias);
            seen = now;
            System.out.println("reloaded");
        }

        void poll() {
            while (true) {
                try {
                    Thread.sleep(200);
                    reload();
                } catch (Exception e) {
                    // half-written set (the agent renames file by file): keep the current one, retry
                    System.err.println("reload failed, keeping the current files: " + e);
                }
            }
        }
    }

    /** The caller's SPIFFE ID: its certificate's one URI SAN, under the trust domain. */
    static String spiffeId(X509Certificate cert, String trustDomain) throws CertificateException {
        List<String> uris = new ArrayList<>();
        Collection<List<?>> names = cert.getSubjectAlternativeNames();
        if (names != null) {
            for (List<?> name : names) {
                if ((Integer) name.get(0) == 6) uris.add((String) name.get(1));
            }
        }
        if (uris.size() != 1 || !uris.get(0).startsWith("spiffe://" + trustDomain + "/")) {
            throw new CertificateException("not an identity of " + trustDomain + ": " + uris);
        }
        return uris.get(0);
    }

    /** PKIX + CRLs of the current files, then the SPIFFE ID check. */
    static final class SpiffeTrustManager extends X509ExtendedTrustManager {
        private final Reloading files;
        private final String trustDomain;

        SpiffeTrustManager(Reloading files, String trustDomain) {
            this.files = files;
            this.trustDomain = trustDomain;
        }

        @Override public void checkClientTrusted(X509Certificate[] chain, String authType, SSLEngine engine)
                throws CertificateException {
            files.current.trust().checkClientTrusted(chain, authType, engine);
            spiffeId(chain[0], trustDomain);
        }
        @Override public void checkClientTrusted(X509Certificate[] chain, String authType, Socket socket)
                throws CertificateException {
            files.current.trust().checkClientTrusted(chain, authType, socket);
            spiffeId(chain[0], trustDomain);
        }
        @Override public void checkClientTrusted(X509Certificate[] chain, String authType) throws CertificateException {
            files.current.trust().checkClientTrusted(chain, authType);
            spiffeId(chain[0], trustDomain);
        }
        @Override public void checkServerTrusted(X509Certificate[] chain, String authType, SSLEngine engine)
                throws CertificateException { throw new CertificateException("this is a server"); }
        @Override public void checkServerTrusted(X509Certificate[] chain, String authType, Socket socket)
                throws CertificateException { throw new CertificateException("this is a server"); }
        @Override public void checkServerTrusted(X509Certificate[] chain, String authType) throws CertificateException {
            throw new CertificateException("this is a server");
        }
        @Override public X509Certificate[] getAcceptedIssuers() { return files.current.trust().getAcceptedIssuers(); }
    }

    /** Presents the current certificate; the alias names its generation, so chain and key match. */
    static final class ReloadingKeyManager extends X509ExtendedKeyManager {
        private final Reloading files;

        ReloadingKeyManager(Reloading files) { this.files = files; }

        @Override public String chooseEngineServerAlias(String keyType, Principal[] issuers, SSLEngine engine) {
            return files.current.alias();
        }
        @Override public String chooseServerAlias(String keyType, Principal[] issuers, Socket socket) {
            return files.current.alias();
        }
        @Override public X509Certificate[] getCertificateChain(String alias) {
            Files_ held = files.generations.get(alias);
            return held == null ? null : held.chain();
        }
        @Override public PrivateKey getPrivateKey(String alias) {
            Files_ held = files.generations.get(alias);
            return held == null ? null : held.key();
        }
        @Override public String[] getServerAliases(String keyType, Principal[] issuers) {
            return new String[] {files.current.alias()};
        }
        @Override public String[] getClientAliases(String keyType, Principal[] issuers) { return null; }
        @Override public String chooseClientAlias(String[] keyType, Principal[] issuers, Socket socket) { return null; }
    }

    public static void main(String[] args) throws Exception {
        Reloading files = new Reloading(Path.of(args[0]), Path.of(args[1]));
        String trustDomain = args[2];
        SSLContext context = SSLContext.getInstance("TLS");
        context.init(new ReloadingKeyManager[] {new ReloadingKeyManager(files)},
                new SpiffeTrustManager[] {new SpiffeTrustManager(files, trustDomain)}, null);
        context.getServerSessionContext().setSessionCacheSize(1); // resumption would skip the CRL check
        context.getServerSessionContext().setSessionTimeout(1);
        HttpsServer server = HttpsServer.create(new InetSocketAddress("127.0.0.1", 0), 64);
        server.setHttpsConfigurator(new HttpsConfigurator(context) {
            @Override public void configure(HttpsParameters params) {
                var ssl = getSSLContext().getDefaultSSLParameters();
                ssl.setNeedClientAuth(true); // no client certificate, no handshake
                ssl.setProtocols(new String[] {"TLSv1.3", "TLSv1.2"});
                params.setSSLParameters(ssl);
            }
        });
        server.createContext("/", exchange -> {
            X509Certificate caller = (X509Certificate) ((HttpsExchange) exchange).getSSLSession().getPeerCertificates()[0];
            String body;
            try {
                body = "{\"caller\": \"" + spiffeId(caller, trustDomain) + "\", \"serial\": \""
                        + caller.getSerialNumber().toString(16) + "\"}";
            } catch (CertificateException e) {
                body = "{}";
            }
            byte[] bytes = body.getBytes(StandardCharsets.UTF_8);
            exchange.getResponseHeaders().set("content-type", "application/json");
            exchange.sendResponseHeaders(200, bytes.length);
            exchange.getResponseBody().write(bytes);
            exchange.close();
        });
        server.setExecutor(java.util.concurrent.Executors.newFixedThreadPool(8));
        server.start();
        System.out.println("listening " + server.getAddress().getPort());
        files.poll();
    }
}
